"""ComfyUI's TorchCompileModel (inductor, on CPU) with a token cache, in either
order: the cached model runs compiled and gives the eager cached result, a
second sampling run compiles nothing new (the cache's per-step decisions
stay out of the graphs), and at cycle_length 1 the result is bit-identical
to the compiled model without a cache."""
import pytest
import torch
import torch._dynamo.utils

import tiny_models
from comfy_extras.nodes_torch_compile import TorchCompileModel

from dit_token_cache.accel_core.config import CacheConfig
from dit_token_cache.nodes.patcher import SETTINGS_KEY, apply_token_cache

FAMILY = "flux_schnell"
SAMPLING = dict(steps=6, seed=11, cfg=2.0, width=64, height=64)


def _graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def _compiled(model):
    return TorchCompileModel.execute(model, "inductor").result[0]


@pytest.fixture(scope="module")
def flux(tiny_model):
    torch._dynamo.reset()
    yield tiny_model(FAMILY)
    torch._dynamo.reset()


def _sample(model):
    return tiny_models.sample(model, FAMILY, **SAMPLING)


def _stats(model):
    return model.model_options["transformer_options"][SETTINGS_KEY].last_run.stats


def test_compiled_uncached_and_cycle_one_are_bit_identical(flux):
    before = _graphs()
    compiled = _sample(_compiled(flux))
    assert _graphs() > before   # it really compiled
    off = apply_token_cache(_compiled(flux), CacheConfig(cycle_length=1))
    assert torch.equal(_sample(off), compiled)
    assert _stats(off).counts()["full"] == SAMPLING["steps"]


@pytest.mark.parametrize("order", ["cache_then_compile", "compile_then_cache"])
def test_cached_model_runs_compiled_without_recompiling(flux, order):
    config = CacheConfig(cycle_length=3, cache_ratio=0.5)
    eager = apply_token_cache(flux, config)
    expected = _sample(eager)
    model = _compiled(apply_token_cache(flux, config)) if order == "cache_then_compile" \
        else apply_token_cache(_compiled(flux), config)
    first = _sample(model)
    torch.testing.assert_close(first, expected, rtol=1e-4, atol=1e-4)
    stats = _stats(model)
    assert stats.counts() == _stats(eager).counts() == {"full": 2, "aggressive": 2, "conservative": 2}
    assert stats.work_fraction == pytest.approx(_stats(eager).work_fraction)
    graphs = _graphs()
    assert torch.equal(_sample(model), first)
    assert _graphs() == graphs   # the second run reuses every graph: no recompiles
