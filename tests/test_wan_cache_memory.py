"""The Wan cache-memory formula (scripts/wan_cache_memory.py) is what a real run stores:
it must equal the measured peak byte for byte on a tiny Wan model."""
import pytest
import torch

import tiny_models
from wan_cache_memory import video_tokens, wan_cache_bytes

from dit_token_cache.accel_core.config import CacheConfig
from dit_token_cache.nodes.patcher import SETTINGS_KEY, apply_token_cache

FAMILY = "wan_t2v"
SIZE = dict(width=64, height=64, frames=9)


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model(FAMILY)


@pytest.mark.parametrize("selector, forecast", [("random", "reuse"), ("similarity", "reuse"), ("random", "linear"),
                                               ("similarity", "quadratic")])
def test_formula_equals_the_measured_peak(model, selector, forecast):
    config = CacheConfig(cycle_length=3, cache_ratio=0.75, selector=selector, forecast=forecast, mode="toca")
    patched = apply_token_cache(model, config)
    tiny_models.sample(patched, FAMILY, steps=9, seed=3, **SIZE)   # CFG: cond and uncond cached; 3 full steps
    measured = patched.model_options["transformer_options"][SETTINGS_KEY].last_run.stats.peak_cache_bytes
    unet = model.model.model_config.unet_config
    dtype_bytes = torch.empty((), dtype=model.model.get_dtype_inference()).element_size()
    expected = wan_cache_bytes(video_tokens(**SIZE), unet["dim"], unet["num_layers"], dtype_bytes, conds=2, selector=selector,
                               forecast_order=config.forecast_order)
    assert measured == expected
