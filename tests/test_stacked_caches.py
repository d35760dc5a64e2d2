"""Two token-cache nodes in a row: the last one wins. Its patches replace
the earlier one's, so the result is the same as the last node alone (same
latents, same work), and the earlier node's own output model is unchanged."""
import pytest
import torch

import tiny_models

from dit_token_cache.accel_core.config import CacheConfig
from dit_token_cache.nodes.patcher import SETTINGS_KEY, WRAPPER_KEY, apply_token_cache

CASES = {   # one family of each engine: block replacement (Flux), module object patches (Wan)
    "flux_schnell": dict(width=64, height=64, cfg=2.0),
    "wan_t2v": dict(width=32, height=32, frames=5, cfg=2.0),
}
FIRST = CacheConfig(cycle_length=2, cache_ratio=0.5, seed=5)
SECOND = CacheConfig(cycle_length=3, cache_ratio=0.7, seed=9, forecast="linear")


@pytest.fixture(scope="module", params=sorted(CASES))
def family_model(request, tiny_model):
    return request.param, tiny_model(request.param)


def _sample(family, model):
    return tiny_models.sample(model, family, steps=7, seed=11, **CASES[family])


def _stats(model):
    return model.model_options["transformer_options"][SETTINGS_KEY].last_run.stats


def test_second_duca_replaces_the_first(family_model, caplog):
    family, model = family_model
    first = apply_token_cache(model, FIRST, name="DuCa[first]")
    alone_first = _sample(family, first)
    stacked = apply_token_cache(first, SECOND, name="DuCa[second]")
    assert "DuCa[second] replaces DuCa[first]" in caplog.text
    assert len(stacked.get_wrappers("outer_sample", WRAPPER_KEY)) == 1
    alone = apply_token_cache(model, SECOND, name="DuCa[second]")
    assert stacked.object_patches.keys() == alone.object_patches.keys()
    out = _sample(family, stacked)
    assert torch.equal(out, _sample(family, alone))
    stats, alone_stats = _stats(stacked), _stats(alone)
    assert stats.counts() == alone_stats.counts() and stats.counts()["full"] == 3   # cycles of 3 in 7 steps
    assert stats.work_fraction == alone_stats.work_fraction and stats.notes == alone_stats.notes
    # the first node's own model still runs its own settings
    assert torch.equal(_sample(family, first), alone_first)
    assert _stats(first).counts()["full"] == 4


def test_tokencache_after_duca_replaces_it(tiny_model):
    family = "flux_schnell"
    model = tiny_model(family)
    tokencache = CacheConfig(mode="tokencache", cache_ratio=0.75, i_steps=3, protected_last_blocks=1)
    stacked = apply_token_cache(apply_token_cache(model, FIRST), tokencache, name="TokenCache[fallback]")
    alone = apply_token_cache(model, tokencache, name="TokenCache[fallback]")
    assert torch.equal(_sample(family, stacked), _sample(family, alone))
    assert _stats(stacked).counts() == {"full": 3, "aggressive": 0, "conservative": 4}
    assert _stats(stacked).work_fraction == _stats(alone).work_fraction
