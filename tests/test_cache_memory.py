"""Video-sized caches (issue 11): stored precision, a memory budget, FORA's
final-state-only cache, and ComfyUI's memory reservation while the model loads."""
import pytest
import torch

import comfy.model_management
import tiny_models

from dit_token_cache.accel_core.cache_store import CacheStore
from dit_token_cache.accel_core.config import CacheConfig
from dit_token_cache.accel_core.forecast import FeatureHistory
from dit_token_cache.accel_core.precision import pack, unpack, write
from dit_token_cache.nodes.patcher import SETTINGS_KEY, apply_token_cache

CASES = {   # one family of each engine: block replacement (Flux), module object patches (Wan)
    "flux_schnell": dict(width=64, height=64, cfg=2.0),
    "wan_t2v": dict(width=32, height=32, frames=5, cfg=2.0),
}
STEPS = 8


# -- precision, framework-free ---------------------------------------------------------

def _per_token_error(estimate, value):
    return ((estimate.float() - value).norm(dim=-1) / value.norm(dim=-1)).max()


def test_packing_keeps_values_within_the_precision_and_the_stated_bytes():
    torch.manual_seed(0)
    # tokens of very different magnitude: a per-token scale keeps each within fp8's relative precision
    value = torch.randn(2, 16, 64) * torch.logspace(-3, 3, 16).view(1, 16, 1)
    model = pack(value, "model")
    assert torch.equal(unpack(model), value) and model.nbytes == value.numel() * 4
    bf16 = pack(value, "bf16")
    assert bf16.nbytes == value.numel() * 2 and unpack(bf16).dtype == torch.float32
    assert _per_token_error(unpack(bf16), value) < 2**-8
    fp8 = pack(value, "fp8")
    assert fp8.nbytes == value.numel() + 2 * 16 * 4   # 1 byte a value, one float32 scale a token
    assert unpack(fp8).dtype == torch.float32 and _per_token_error(unpack(fp8), value) < 0.05
    # a bf16 value is already as small as bf16 storage makes it; fp8 still halves it
    assert pack(value.bfloat16(), "bf16").nbytes == value.numel() * 2
    assert pack(value.bfloat16(), "fp8").nbytes < value.numel() * 2
    # tokens written back: only those change, each at the precision's error
    index = torch.tensor([3, 9])
    fresh = torch.randn(2, 2, 64) * 100
    for packed in (model, bf16, fp8):
        before = unpack(packed).clone()
        write(packed, index, fresh)
        after = unpack(packed)
        assert _per_token_error(after[:, index], fresh) < 0.05
        keep = torch.ones(16, dtype=torch.bool)
        keep[index] = False
        assert torch.equal(after[:, keep], before[:, keep])
        assert torch.equal(unpack(packed, index), after[:, index])


def test_forecast_at_lower_precision_follows_the_full_precision_one():
    torch.manual_seed(1)
    line = lambda t: torch.ones(1, 8, 32) * 3 + torch.randn(1, 8, 32) * 0.01 + t * torch.linspace(1, 2, 32)  # noqa: E731
    exact, narrow = FeatureHistory(2), FeatureHistory(2, precision="fp8")
    for t in (0.9, 0.7):
        value = line(t)
        exact.put(value, t)
        narrow.put(value, t)
    assert narrow.nbytes < exact.nbytes / 3
    assert _per_token_error(narrow.estimate(0.5), exact.estimate(0.5)) < 0.05


def test_store_budget_helpers_project_full_histories_and_drop_whole_blocks():
    store = CacheStore(depth=2, precision="bf16")
    value = torch.randn(2, 10, 8)
    store.put_feature(["a", "b"], (0, "out"), value, 0.9)
    store.put(["a", "b"], (0, "staleness"), torch.zeros(2, 10, dtype=torch.int32))
    store.put_feature(["a", "b"], (1, "out"), value, 0.9)
    # one anchor now, two once the history is full; staleness does not grow
    assert store.block_bytes("a", 0) == 2 * 10 * 8 * 2 + 10 * 4
    assert store.largest_feature_bytes("a", 0) == 2 * 10 * 8 * 2
    before = store.nbytes
    store.drop_block(0)
    assert not store.has(["a"], (0, "out")) and store.has(["a", "b"], (1, "out"))
    assert store.nbytes == before - 2 * (10 * 8 * 2 + 10 * 4)


# -- through ComfyUI --------------------------------------------------------------------

@pytest.fixture(scope="module", params=sorted(CASES))
def family_model(request, tiny_model):
    return request.param, tiny_model(request.param)


def _sample(family, model, **kw):
    return tiny_models.sample(model, family, steps=STEPS, seed=11, **{**CASES[family], **kw})


def _run(family, model, split=False, **settings):
    patched = apply_token_cache(model, CacheConfig(cycle_length=3, cache_ratio=0.5, **settings))
    usual = patched.model.memory_usage_factor
    if split:
        patched.model.memory_usage_factor = 1e15   # nothing fits: ComfyUI runs cond and uncond one at a time
    try:
        out = _sample(family, patched)
    finally:
        patched.model.memory_usage_factor = usual
    return out, patched.model_options["transformer_options"][SETTINGS_KEY].last_run


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_lower_precision_shrinks_the_cache_and_stays_close(family_model):
    family, model = family_model
    exact, exact_run = _run(family, model, cache_precision="model")
    assert next(model.model.diffusion_model.parameters()).dtype == torch.float32
    for precision, share, tolerance in (("bf16", 0.5, 0.02), ("fp8", 0.25, 0.1)):
        out, run = _run(family, model, cache_precision=precision)
        peak, exact_peak = run.stats.peak_cache_bytes, exact_run.stats.peak_cache_bytes
        # staleness counters and selector entries stay as they are: a little above the share
        assert share * exact_peak <= peak < (share + 0.1) * exact_peak, (precision, peak, exact_peak)
        assert torch.isfinite(out).all() and _rel(out, exact) < tolerance, (precision, _rel(out, exact))
        assert run.stats.counts() == exact_run.stats.counts()
        assert torch.equal(out, _run(family, model, cache_precision=precision)[0])   # run to run
    # batched and split CFG compute to float rounding apart; rounding to fp8 can turn that into one fp8 step
    # on a few values: they agree to the cache's precision, not to float rounding
    for precision, tolerance in (("bf16", 1e-3), ("fp8", 1e-2)):
        split, _ = _run(family, model, split=True, cache_precision=precision)
        batched, _ = _run(family, model, cache_precision=precision)
        print(family, precision, "split vs batched", _rel(split, batched))
        assert _rel(split, batched) < tolerance, (precision, _rel(split, batched))


def test_budget_caches_the_blocks_that_fit_and_computes_the_others(family_model):
    family, model = family_model
    unlimited, unlimited_run = _run(family, model, forecast="linear")
    full_peak = unlimited_run.stats.peak_cache_bytes
    budget = full_peak * 0.5
    out, run = _run(family, model, forecast="linear", cache_budget_gb=budget / 2**30)
    cached, blocks = run.stats.blocks_cached
    assert 0 < cached < blocks, run.stats.blocks_cached
    assert [run.block_cached[b] for b in sorted(run.block_cached)] == [True] * cached + [False] * (blocks - cached)
    assert run.stats.peak_cache_bytes <= budget, (run.stats.peak_cache_bytes, budget)
    assert f"{cached}/{blocks} blocks cached" in run.stats.headline("DuCa")
    # blocks beyond the budget compute in full: more work
    assert run.stats.work_fraction > unlimited_run.stats.work_fraction
    assert run.stats.counts() == unlimited_run.stats.counts() and torch.isfinite(out).all()
    # decided from one cond and the cond count: split CFG keeps the same blocks
    split, split_run = _run(family, model, split=True, forecast="linear", cache_budget_gb=budget / 2**30)
    assert split_run.block_cached == run.block_cached
    torch.testing.assert_close(split, out, rtol=1e-4, atol=1e-4)
    # a budget too small for any block still runs: aggressive steps on the final state alone
    # (conservative steps then compute every block in full: all the work but the aggressive steps')
    tiny, tiny_run = _run(family, model, forecast="linear", cache_budget_gb=1e-9)
    assert tiny_run.stats.blocks_cached[0] == 0 and torch.isfinite(tiny).all()
    counts = tiny_run.stats.counts()
    assert tiny_run.stats.work_fraction == pytest.approx(1 - counts["aggressive"] / STEPS)


def test_fora_keeps_only_the_final_state(family_model):
    family, model = family_model
    out, run = _run(family, model, mode="fora")
    duca_peak = _run(family, model)[1].stats.peak_cache_bytes
    assert 0 < run.stats.peak_cache_bytes < duca_peak / 4, (run.stats.peak_cache_bytes, duca_peak)
    assert run.stats.counts()["aggressive"] > 0 and torch.isfinite(out).all()


def test_model_loading_keeps_room_for_the_cache_while_sampling(tiny_model):
    family = "flux_schnell"
    model = tiny_model(family)
    usual = comfy.model_management.extra_reserved_memory()
    seen = []
    patched = apply_token_cache(model, CacheConfig(cycle_length=3, cache_budget_gb=1.5))

    def watch(apply_model, args):
        seen.append(comfy.model_management.extra_reserved_memory())
        return apply_model(args["input"], args["timestep"], **args["c"])
    patched.set_model_unet_function_wrapper(watch)
    _sample(family, patched)
    assert seen and set(seen) == {usual + int(1.5 * 2**30)}
    assert comfy.model_management.extra_reserved_memory() == usual
    # on CPU memory nothing is reserved on the model's device
    seen.clear()
    offloaded = apply_token_cache(model, CacheConfig(cycle_length=3, cache_budget_gb=1.5, cache_device="cpu"))
    offloaded.set_model_unet_function_wrapper(watch)
    _sample(family, offloaded)
    assert set(seen) == {usual}
    # without a budget: the projection before the first run of a size (test_cache_projection.py: it
    # equals the run's peak), then what the cache took in the last run of this size
    unbounded = apply_token_cache(model, CacheConfig(cycle_length=3))
    unbounded.set_model_unet_function_wrapper(watch)
    settings = unbounded.model_options["transformer_options"][SETTINGS_KEY]
    for width in (64, 64, 32):
        seen.clear()
        _sample(family, unbounded, width=width, height=width)
        peak = settings.last_run.stats.peak_cache_bytes
        assert peak > 0 and set(seen) == {usual + peak}
    assert settings.measured_peaks[((1, 16, 8, 8), 2)] > settings.measured_peaks[((1, 16, 4, 4), 2)]
    settings.measured_peaks[((1, 16, 8, 8), 2)] = 12345   # a measured size reserves its measurement
    seen.clear()
    _sample(family, unbounded)
    assert set(seen) == {usual + 12345}
    assert comfy.model_management.extra_reserved_memory() == usual
