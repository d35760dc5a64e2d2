"""The reference model converted to diffusers' FluxTransformer2DModel
(reference/diffusers_model.py) computes what ComfyUI's Flux computes from the
shipped file, and its Euler loop reproduces ComfyUI's KSampler samples: the
ground for comparing the pack with diffusers' own caches on the same model.
Tolerances: float32 rounding of two implementations (measured: model output
3.4e-6 of values up to 6.4; a 20-step CFG sample 1.8e-5 of values up to 1.0)."""
import subprocess
import sys

import pytest
import torch

import comfy.sample
import comfy.samplers
import comfy.sd

from conftest import REPO

from dit_token_cache.reference import diffusers_model  # noqa: E402
from dit_token_cache.reference.model import MODEL_FILE, conditioning, label_encoder  # noqa: E402

LABELS = torch.tensor([[0, 1, 2], [3, 0, 1]])


@pytest.fixture(scope="module")
def models():
    return comfy.sd.load_diffusion_model(str(MODEL_FILE)), diffusers_model.load_reference_transformer()


@pytest.mark.parametrize("sigma", [1.0, 0.55, 0.05])
def test_same_model_output_as_comfyui(models, sigma):
    comfy_model, transformer = models
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    context = label_encoder()(LABELS)
    with torch.no_grad():
        expected = comfy_model.model.diffusion_model(x, torch.full((2,), sigma), context=context, y=None, guidance=None)
        got = diffusers_model.predict(transformer, x, sigma, context)
    assert (got - expected).abs().max() < 1e-4 * expected.abs().max()


@pytest.mark.parametrize("steps", [7, 20, 28, 50])
def test_sigmas_are_comfyuis_simple_schedule(models, steps):
    expected = comfy.samplers.calculate_sigmas(models[0].model.model_sampling, "simple", steps)
    assert torch.equal(diffusers_model.simple_sigmas(steps), expected.float())


def test_sampling_loop_reproduces_the_comfyui_sample(models):
    comfy_model, transformer = models
    latent = torch.zeros(2, 16, 8, 8)
    noise = comfy.sample.prepare_noise(latent, 5)
    positive, negative = conditioning(LABELS)
    expected = comfy.sample.sample(comfy_model, noise, 20, 4.0, "euler", "simple", positive, negative, latent, seed=5)
    got = diffusers_model.sample(transformer, noise, LABELS, steps=20, cfg=4.0)
    assert (comfy_model.model.process_latent_in(expected) - got).abs().max() < 1e-3


def test_saved_model_loads_back_in_diffusers(models, tmp_path):
    from diffusers import FluxTransformer2DModel
    subprocess.run([sys.executable, str(REPO / "scripts" / "convert_reference_to_diffusers.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    loaded = FluxTransformer2DModel.from_pretrained(str(tmp_path)).eval()
    converted = models[1].state_dict()
    assert loaded.state_dict().keys() == converted.keys()
    assert all(torch.equal(value, converted[name]) for name, value in loaded.state_dict().items())
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    context = label_encoder()(LABELS[:1])
    with torch.no_grad():
        expected = diffusers_model.predict(models[1], x, 0.5, context)
        assert (diffusers_model.predict(loaded, x, 0.5, context) - expected).abs().max() < 1e-5 * expected.abs().max()


SHIPPED_PREDICTORS = [None, "shapes_reference_mlp_mixer.safetensors", "shapes_reference_predictor.safetensors",
                      "shapes_reference_predictor_lora.safetensors"]
TOKENCACHE = dict(mode="tokencache", cache_ratio=0.9, i_steps=4, protected_last_blocks=2)


def _comfyui_tokencache(comfy_model, predictor, noise, steps):
    from dit_token_cache.accel_core.config import CacheConfig
    from dit_token_cache.nodes.patcher import apply_token_cache
    from dit_token_cache.nodes.tokencache_nodes import load_for_model, step_importance
    learned, calibration, lora = (None, None, None) if predictor is None else load_for_model(comfy_model, predictor)
    patched = apply_token_cache(comfy_model, CacheConfig(**TOKENCACHE), predictor=learned, lora=lora,
                                calibration=step_importance(calibration, "measured"))
    positive, negative = conditioning(LABELS)
    # cfg 1: the cond alone, as one call a step in both frameworks (a batched CFG call plans from its first
    # cond in ComfyUI and from all its rows in diffusers)
    out = comfy.sample.sample(patched, noise, steps, 1.0, "euler", "simple", positive, negative,
                              torch.zeros_like(noise), seed=5)
    return comfy_model.model.process_latent_in(out)


def _diffusers_euler(transformer, noise, steps):
    context = label_encoder()(LABELS)
    sigmas = diffusers_model.simple_sigmas(steps).tolist()
    x = noise * sigmas[0]
    with torch.no_grad():
        for sigma, following in zip(sigmas, sigmas[1:]):
            x = x + diffusers_model.predict(transformer, x, sigma, context) * (following - sigma)
    return x


@pytest.mark.parametrize("predictor", SHIPPED_PREDICTORS)
def test_tokencache_predictor_files_drive_diffusers_as_they_drive_comfyui(models, predictor):
    """A predictor file trained in ComfyUI (mlp_mixer; first block, its ComfyUI weights renamed to diffusers';
    first block with LoRA adapters, their fused layers split) and the training-free scoring plan the same
    tokens, I-steps and refinements through dit_token_cache.diffusers: the same sample to float32 rounding
    (measured 7e-6; without the LoRA adapters 0.76, with a first block whose q and k rows are swapped 0.07)."""
    from types import SimpleNamespace
    from dit_token_cache.diffusers import apply_token_cache
    from dit_token_cache.reference.model import PREDICTOR_DIR
    comfy_model, transformer = models
    steps = 20
    noise = comfy.sample.prepare_noise(torch.zeros(2, 16, 8, 8), 5)
    expected = _comfyui_tokencache(comfy_model, predictor, noise, steps)
    uncached = _diffusers_euler(transformer, noise, steps)
    handle = apply_token_cache(transformer, scheduler=SimpleNamespace(sigmas=diffusers_model.simple_sigmas(steps)),
                               predictor=None if predictor is None else PREDICTOR_DIR / predictor, **TOKENCACHE)
    try:
        got = _diffusers_euler(transformer, noise, steps)
        name = "fallback" if predictor is None else "learned+LoRA" if "lora" in predictor else "learned"
        assert handle.summary().startswith(f"TokenCache[{name}]") and "4 full, 16 conservative" in handle.summary()
    finally:
        handle.remove()
    assert (got - expected).abs().max() < 1e-4 * expected.abs().max()
    assert (got - uncached).abs().max() > 1e-2   # the cache acted
    assert torch.equal(_diffusers_euler(transformer, noise, steps), uncached)   # and left as it came


def test_a_predictor_lora_in_cached_blocks_is_refused(models):
    from types import SimpleNamespace
    from dit_token_cache.diffusers import apply_token_cache
    from dit_token_cache.reference.model import PREDICTOR_DIR
    with pytest.raises(ValueError, match=r"refine blocks \[6, 7\].*protected_last_blocks=1 leaves \[6\] cached"):
        apply_token_cache(models[1], scheduler=SimpleNamespace(sigmas=diffusers_model.simple_sigmas(4)),
                          predictor=PREDICTOR_DIR / "shapes_reference_predictor_lora.safetensors",
                          **{**TOKENCACHE, "protected_last_blocks": 1})
    assert not any(getattr(m, "_diffusers_hook", None) and m._diffusers_hook.hooks for m in models[1].modules())
