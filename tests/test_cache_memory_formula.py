"""The cache-memory formula (scripts/cache_memory.py) is what a real run
stores: it must equal the measured peak byte for byte on tiny Wan and Flux
models, for every forecast order, precision and mode fora. Under a memory
budget the formula gives the cache once the first step has decided which
blocks fit; during that step the first block of a size is stored before its
size is known, so the peak may pass it by at most one block."""
import pytest
import torch

import tiny_models
from cache_memory import flux_cache_bytes, video_tokens, wan_cache_bytes

from dit_token_cache.accel_core.config import CacheConfig
from dit_token_cache.nodes.patcher import SETTINGS_KEY, apply_token_cache

WAN_SIZE = dict(width=64, height=64, frames=9)
FLUX_SIZE = dict(width=64, height=64)
SETTINGS = [dict(selector="random", forecast="reuse"), dict(selector="similarity", forecast="reuse"),
            dict(selector="random", forecast="linear"), dict(selector="similarity", forecast="quadratic"),
            dict(forecast="linear", cache_precision="bf16"), dict(forecast="reuse", cache_precision="fp8"),
            dict(forecast="linear", cache_precision="fp8", budget_share=0.5),
            dict(forecast="reuse", cache_precision="bf16", budget_share=0.3), dict(forecast="linear", mode="fora")]


def _measure(model, family, size, settings, full_peak=None):
    settings = dict(settings)
    share = settings.pop("budget_share", None)
    budget = share * full_peak if share else None
    config = CacheConfig(cycle_length=3, cache_ratio=0.75, mode=settings.pop("mode", "toca"),
                         cache_budget_gb=budget / 2**30 if budget else 0.0, **settings)
    patched = apply_token_cache(model, config)
    tiny_models.sample(patched, family, steps=9, seed=3, cfg=2.0, **size)   # CFG: cond and uncond; 3 full steps
    run = patched.model_options["transformer_options"][SETTINGS_KEY].last_run
    return config, run.stats, config.cache_budget_bytes if budget else None


def _dtype_bytes(model):
    return torch.empty((), dtype=model.model.get_dtype_inference()).element_size()


def _check(model, family, size, settings, formula, blocks):
    """Measure a run with `settings` and compare with formula(model, config, **kw)
    -> (bytes, blocks kept); under a budget, the peak within one block."""
    unlimited = {"forecast": settings["forecast"], "cache_precision": settings.get("cache_precision", "model")}
    full_peak = _measure(model, family, size, unlimited)[1].peak_cache_bytes
    config, stats, budget = _measure(model, family, size, settings, full_peak)
    expected, kept = formula(model, config, forecast_order=config.forecast_order, budget_bytes=budget)
    if not budget:
        assert stats.peak_cache_bytes == expected
        return
    one_block = formula(model, config, forecast_order=0)[0] // blocks * 2   # a bound on one anchor of one block
    assert expected <= stats.peak_cache_bytes <= max(expected, budget) + one_block, (stats.peak_cache_bytes, expected)
    assert stats.blocks_cached[0] == kept, (stats.blocks_cached, kept)
    assert kept > 0 or settings["budget_share"] < 0.5


@pytest.mark.parametrize("settings", SETTINGS, ids=str)
def test_wan_formula_equals_the_measured_peak(tiny_model, settings):
    def formula(model, config, **kw):
        unet = model.model.model_config.unet_config
        return wan_cache_bytes(video_tokens(**WAN_SIZE), unet["dim"], unet["num_layers"], _dtype_bytes(model), conds=2,
                               selector=config.selector, precision=config.cache_precision, mode=config.mode, **kw)
    model = tiny_model("wan_t2v")
    _check(model, "wan_t2v", WAN_SIZE, settings, formula, model.model.model_config.unet_config["num_layers"])


@pytest.mark.parametrize("settings", [s for s in SETTINGS if s.get("selector", "random") == "random"], ids=str)
def test_flux_formula_equals_the_measured_peak(tiny_model, settings):
    def formula(model, config, **kw):
        unet = model.model.model_config.unet_config
        positive, _ = tiny_models.conditioning("flux_schnell", model)
        img_tokens = (FLUX_SIZE["width"] // 16) * (FLUX_SIZE["height"] // 16)
        return flux_cache_bytes(img_tokens, positive[0][0].shape[1], unet["hidden_size"], unet["depth"],
                                unet["depth_single_blocks"], _dtype_bytes(model), conds=2,
                                precision=config.cache_precision, mode=config.mode, **kw)
    model = tiny_model("flux_schnell")
    unet = model.model.model_config.unet_config
    _check(model, "flux_schnell", FLUX_SIZE, settings, formula, unet["depth"] + unet["depth_single_blocks"])
