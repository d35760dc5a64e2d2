"""What users combine a token cache with, against the real ComfyUI on CPU:
attention overrides, ControlNet on a Flux-family model, and another cache
node (EasyCache) in the same graph. (LoRA: test_duca_flux.py; Wan 2.2's two
models: test_wan22_split.py; two token-cache nodes: test_stacked_caches.py;
torch.compile: test_torch_compile.py.)"""
import pytest
import torch

import comfy.controlnet
import comfy.ops
import nodes
import tiny_models
from comfy.ldm.flux.controlnet import ControlNetFlux
from comfy_extras.nodes_easycache import EasyCacheNode

from dit_token_cache.accel_core.config import CacheConfig
from dit_token_cache.nodes.patcher import SETTINGS_KEY, apply_token_cache

CASES = {
    "flux_schnell": dict(width=64, height=64, cfg=2.0),
    "wan_t2v": dict(width=32, height=32, frames=5, cfg=2.0),
}
STEPS = 8


def _sample(family, model, **kw):
    return tiny_models.sample(model, family, steps=STEPS, seed=11, **{**CASES[family], **kw})


def _stats(model):
    return model.model_options["transformer_options"][SETTINGS_KEY].last_run.stats


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module", params=sorted(CASES))
def family_model(request, tiny_model):
    return request.param, tiny_model(request.param)


def test_the_users_attention_override_computes_every_attention(family_model):
    """ComfyUI's attention override (transformer_options
    optimized_attention_override, as attention-patching nodes set it) is
    called for every attention the cached model computes: at a full step as
    often as in an uncached model call, and what it returns is what the
    model uses."""
    family, model = family_model
    cached = apply_token_cache(model, CacheConfig(cycle_length=3, cache_ratio=0.5))
    settings = cached.model_options["transformer_options"][SETTINGS_KEY]
    calls = {}

    def counting(func, *args, **kwargs):
        run = settings.active_run
        key = run.plan.kind.value if run is not None and run.plan is not None else "uncached"
        calls[key] = calls.get(key, 0) + 1
        return func(*args, **kwargs)

    def doubling(func, *args, **kwargs):
        return 2 * func(*args, **kwargs)

    plain = _sample(family, cached)
    overridden = cached.clone()
    overridden.model_options["transformer_options"]["optimized_attention_override"] = counting
    assert torch.equal(_sample(family, overridden), plain)
    counts = _stats(overridden).counts()
    uncached = model.clone()
    uncached.model_options["transformer_options"]["optimized_attention_override"] = counting
    _sample(family, uncached)
    per_call = calls["uncached"] / STEPS   # cond and uncond batched: one model call per step
    assert calls["full"] == per_call * counts["full"], (calls, counts)
    assert "aggressive" not in calls        # aggressive steps compute no attention
    # what the override returns is used: a changed attention changes the cached run
    changed = cached.clone()
    changed.model_options["transformer_options"]["optimized_attention_override"] = doubling
    assert not torch.equal(_sample(family, changed), plain)


def _tiny_flux_controlnet(model, seed=0):
    """A Flux ControlNet (XLabs layout) of the tiny model's sizes, built like
    the tiny checkpoints and loaded through ComfyUI's own detection."""
    config = dict(model.model.model_config.unet_config)
    torch.manual_seed(seed)
    control = ControlNetFlux(operations=comfy.ops.disable_weight_init, **config)
    for p in control.parameters():
        torch.nn.init.normal_(p, std=0.05)
    # XLabs files name the RMSNorm weights "scale", which is how ComfyUI tells them apart
    state_dict = {k.replace("_norm.weight", "_norm.scale"): v for k, v in control.state_dict().items()}
    return comfy.controlnet.load_controlnet_state_dict(state_dict)


def test_flux_controlnet_steers_the_cached_model(tiny_model):
    family = "flux_schnell"
    model = tiny_model(family)
    control_net = _tiny_flux_controlnet(model)
    assert isinstance(control_net, comfy.controlnet.ControlNet)
    positive, negative = tiny_models.conditioning(family, model)
    hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(2))
    positive, negative = nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, control_net, hint,
                                                                          1.0, 0.0, 1.0)
    kw = dict(positive=positive, negative=negative)
    cached = apply_token_cache(model, CacheConfig(cycle_length=3, cache_ratio=0.5))
    without = _sample(family, cached)
    steered = _sample(family, cached, **kw)
    assert not torch.equal(steered, without) and torch.isfinite(steered).all()
    assert _stats(cached).counts() == {"full": 3, "aggressive": 3, "conservative": 2}
    assert torch.equal(steered, _sample(family, cached, **kw))           # run to run
    # exact where nothing is cached, and close to the uncached steered run where it is
    uncached = _sample(family, model, **kw)
    assert torch.equal(_sample(family, apply_token_cache(model, CacheConfig(cycle_length=1)), **kw), uncached)
    assert _rel(steered, uncached) < 0.5


@pytest.mark.parametrize("order", ["easycache_first", "token_cache_first"])
def test_easycache_in_the_same_graph(family_model, order):
    """EasyCache skips whole model calls from outside; the token cache works
    inside the calls EasyCache lets through. Both orders run, repeat exactly
    and keep the token cache's accounting."""
    family, model = family_model
    config = CacheConfig(cycle_length=3, cache_ratio=0.5)

    def easycache(m):
        return EasyCacheNode.execute(m, 0.2, 0.15, 0.95, False).result[0]
    if order == "easycache_first":
        combined = apply_token_cache(easycache(model), config)
    else:
        combined = easycache(apply_token_cache(model, config))
    out = _sample(family, combined)
    assert torch.isfinite(out).all() and torch.equal(out, _sample(family, combined))
    stats = _stats(combined)
    assert len(stats.step_kinds) <= STEPS and 0 < stats.work_fraction < 1.0
    assert _rel(out, _sample(family, model)) < 0.6


def test_multigpu_cfg_split_copies_are_refused_clearly(tiny_model):
    """MultiGPU CFG Split needs a second GPU, which CPU tests do not have; its
    model copies are what the cache refuses: each would run the main copy's
    blocks from another GPU's thread. Marked as ComfyUI marks them, the run
    stops with a clear error before anything loads, and the model then
    samples normally."""
    family = "flux_schnell"
    model = tiny_model(family)
    cached = apply_token_cache(model, CacheConfig(cycle_length=3))
    split = cached.clone()
    copy = cached.clone()
    copy.is_multigpu_base_clone = True
    split.set_additional_models("multigpu", [copy])
    with pytest.raises(ValueError, match="does not work with MultiGPU CFG Split yet.*Remove"):
        _sample(family, split)
    out = _sample(family, cached)
    assert torch.isfinite(out).all() and _stats(cached).counts()["aggressive"] > 0
