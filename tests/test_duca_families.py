"""Every supported family: ComfyUI's own detection loads a tiny checkpoint, DuCa
is exact where nothing is cached, and cached steps really run."""
import pytest
import torch

import comfy.model_patcher
import tiny_models

from dit_token_cache.accel_core.config import CacheConfig
from dit_token_cache.nodes.families import supported_families
from dit_token_cache.nodes.patcher import SETTINGS_KEY, apply_token_cache

# family -> sampling arguments small enough for 2 CPU cores
CASES = {
    "flux_schnell": dict(width=64, height=64, cfg=1.0),
    "chroma": dict(width=32, height=32, cfg=3.0),
    "hunyuan_video": dict(width=32, height=32, cfg=1.0, frames=5),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def family_model(request, tiny_model):
    return request.param, tiny_model(request.param)


def _sample(family, model, **kw):
    return tiny_models.sample(model, family, steps=6, seed=11, **{**CASES[family], **kw})


def test_family_exact_at_cycle_one_and_cached_otherwise(family_model):
    family, model = family_model
    base = _sample(family, model)
    assert torch.equal(_sample(family, apply_token_cache(model, CacheConfig(cycle_length=1))), base)
    assert torch.equal(_sample(family, apply_token_cache(model, CacheConfig(cycle_length=1, forecast="linear",
                                                                            max_error=0.1))), base)

    patched = apply_token_cache(model, CacheConfig(cycle_length=3, cache_ratio=0.5))
    out = _sample(family, patched)
    stats = patched.model_options["transformer_options"][SETTINGS_KEY].last_run.stats
    assert stats.counts() == {"full": 2, "aggressive": 2, "conservative": 2}
    assert 0.0 < stats.token_fraction < 1.0 and not stats.notes
    assert torch.isfinite(out).all() and not torch.equal(out, base)
    assert torch.equal(out, _sample(family, apply_token_cache(model, CacheConfig(cycle_length=3, cache_ratio=0.5))))
    print(f"{family}: rel L2 vs uncached {float((out - base).norm() / base.norm()):.4f}")


def test_unsupported_model_is_named_with_the_supported_families(family_model):
    _, model = family_model
    other = comfy.model_patcher.ModelPatcher(torch.nn.Linear(2, 2), torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(ValueError) as error:
        apply_token_cache(other, CacheConfig())
    assert "Linear" in str(error.value) and supported_families() in str(error.value)


def test_tokencache_first_block_predictor_trains_and_drives_the_family(family_model):
    """The paper's predictor on every Flux-family model: a copy of its first
    block trains with the chained objective through the family's own blocks
    (Chroma's per-block modulation, HunyuanVideo's video tokens), and the
    TokenCache run it drives selects from its scores."""
    from dit_token_cache.nodes.predictor_training import TrainingSettings, train_predictor
    family, model = family_model
    case = CASES[family]
    positive, negative = tiny_models.conditioning(family, model)
    latent = tiny_models.empty_latent(family, case["width"], case["height"], frames=case.get("frames"))
    settings = TrainingSettings(steps=4, cfg=case["cfg"], iterations=6, learning_rate=3e-3)
    predictor, metadata = train_predictor(model, positive, negative, latent, settings)
    assert metadata["training"]["trajectories"] >= 1 and len(metadata["calibration"]["predicted"]) == 3
    config = CacheConfig(mode="tokencache", cache_ratio=0.75, i_steps=2, protected_last_blocks=1)
    patched = apply_token_cache(model, config, predictor=predictor, calibration=None)
    out = _sample(family, patched)
    run = patched.model_options["transformer_options"][SETTINGS_KEY].last_run
    assert torch.isfinite(out).all() and not run.stats.notes
    assert run.stats.predictor_flops > 0 and run.last_selection
