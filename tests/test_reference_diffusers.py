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

sys.path.insert(0, str(REPO))
from reference import diffusers_model  # noqa: E402
from reference.model import MODEL_FILE, conditioning, label_encoder  # noqa: E402

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
