"""Smoke test for harness/tiny_models.py against the real ComfyUI tree ($DTC_COMFYUI or .dtc/ComfyUI)."""

import sys
from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HARNESS = str(Path(__file__).resolve().parents[1] / "harness")
if HARNESS not in sys.path:
    sys.path.insert(0, HARNESS)
import tiny_models  # noqa: E402

tiny_models.ensure_comfy()

# Expected ComfyUI class per family, and the guidance_embed flag detection should give it.
EXPECTED = {
    "flux_dev": ("comfy.ldm.flux.model.Flux", True),
    "flux_schnell": ("comfy.ldm.flux.model.Flux", False),
    "flux2": ("comfy.ldm.flux.model.Flux", False),
    "chroma": ("comfy.ldm.chroma.model.Chroma", None),
    "hunyuan_video": ("comfy.ldm.hunyuan_video.model.HunyuanVideo", True),
    "wan_t2v": ("comfy.ldm.wan.model.WanModel", None),
    "wan_i2v": ("comfy.ldm.wan.model.WanModel", None),
    "wan22_ti2v": ("comfy.ldm.wan.model.WanModel", None),
    "qwen_image": ("comfy.ldm.qwen_image.model.QwenImageTransformer2DModel", None),
    "lumina2": ("comfy.ldm.lumina.model.NextDiT", None),
    "hidream": ("comfy.ldm.hidream.model.HiDreamImageTransformer2DModel", None),   # sizes from the file
    "sd3": ("comfy.ldm.modules.diffusionmodules.mmdit.OpenAISignatureMMDITWrapper", None),
    "sd35_medium": ("comfy.ldm.modules.diffusionmodules.mmdit.OpenAISignatureMMDITWrapper", None),
    "pixart_sigma": ("comfy.ldm.pixart.pixartms.PixArtMS", None),
    "pixart_alpha": ("comfy.ldm.pixart.pixartms.PixArtMS", None),
    "ltxv": ("comfy.ldm.lightricks.model.LTXVModel", None),
}
# Pixel size to sample at where 64 x 64 does not do: PixArtMS's position embedding is NaN for a
# latent side sum under 66.
SAMPLE_SIZE = {"pixart_sigma": (512, 16), "pixart_alpha": (512, 16)}


def test_every_family_is_covered():
    assert set(EXPECTED) == set(tiny_models.FAMILIES)


@pytest.fixture(scope="session")
def checkpoint(model_dir):
    # model_dir (tests/conftest.py) persists between runs; build_checkpoint rebuilds stale files.
    return cache(lambda family: tiny_models.build_checkpoint(family, model_dir / f"{family}_tiny.safetensors"))


@pytest.fixture(scope="session")
def loaded(checkpoint):
    return cache(lambda family: tiny_models.load(family, checkpoint(family)))


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_comfy_detects_the_family(loaded, family):
    import comfy.model_patcher

    class_path, guidance_embed = EXPECTED[family]
    patcher = loaded(family)
    assert isinstance(patcher, comfy.model_patcher.ModelPatcher)
    diffusion_model = patcher.model.diffusion_model
    assert f"{type(diffusion_model).__module__}.{type(diffusion_model).__name__}" == class_path
    if guidance_embed is not None:
        assert diffusion_model.params.guidance_embed is guidance_embed


def test_pixart_alpha_is_told_from_sigma_by_its_size_embedders(loaded):
    for family, config, micro_conditioning in (("pixart_alpha", "PixArtAlpha", True), ("pixart_sigma", "PixArtSigma", False)):
        model = loaded(family).model
        assert type(model.model_config).__name__ == config
        assert model.diffusion_model.micro_conditioning is micro_conditioning


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_sampling_is_finite_and_follows_the_seed(loaded, family):
    # cfg 1 skips the uncond pass: Chroma's pinned 5120-wide approximator dominates the run time.
    patcher = loaded(family)
    width, height = SAMPLE_SIZE.get(family, (64, 64))
    first, other = (tiny_models.sample(patcher, family, steps=2, seed=seed, cfg=1.0, width=width, height=height)
                    for seed in (0, 1))
    assert first.shape == tiny_models.empty_latent(family, width, height)["samples"].shape
    assert torch.isfinite(first).all()
    assert not torch.allclose(first, other)


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_same_seed_builds_identical_weights(checkpoint, family):
    saved = load_file(str(checkpoint(family)))
    rebuilt = tiny_models.build_state_dict(family, seed=0)
    assert saved.keys() == rebuilt.keys()
    assert all(torch.equal(saved[k], rebuilt[k]) for k in saved)


def test_other_seed_gives_other_weights():
    first = tiny_models.build_state_dict("flux_dev", seed=0)
    other = tiny_models.build_state_dict("flux_dev", seed=1)
    assert not any(torch.equal(first[k], other[k]) for k in first)


def test_cache_keeps_matching_file_and_rebuilds_changed_config(tmp_path):
    path = tmp_path / "flux.safetensors"
    tiny_models.build_checkpoint("flux_dev", path)
    built_at = path.stat().st_mtime_ns
    tiny_models.build_checkpoint("flux_dev", path)
    assert path.stat().st_mtime_ns == built_at
    tiny_models.build_checkpoint("flux_dev", path, depth=1)
    assert path.stat().st_mtime_ns != built_at
    assert not any(k.startswith("double_blocks.1.") for k in load_file(str(path)))


def test_conditioning_tokens_decide_cond_uncond_batching(loaded):
    # Same length: cond and uncond run as one batch of 2; different lengths: two batches of 1.
    patcher = loaded("flux_dev").clone()
    batches = []

    def record(apply_model, args):
        batches.append(len(args["cond_or_uncond"]))
        return apply_model(args["input"], args["timestep"], **args["c"])

    patcher.set_model_unet_function_wrapper(record)
    for neg_tokens, expected in ((16, [2]), (7, [1, 1])):
        batches.clear()
        positive, negative = tiny_models.conditioning("flux_dev", patcher, tokens=16, neg_tokens=neg_tokens)
        tiny_models.sample(patcher, "flux_dev", steps=1, cfg=2.0, positive=positive, negative=negative)
        assert batches == expected


def test_conditioning_is_deterministic_and_seeded():
    positive, negative = tiny_models.conditioning("flux_dev", seed=3, tokens=5, neg_tokens=9, batch=2)
    again, _ = tiny_models.conditioning("flux_dev", seed=3, tokens=5, batch=2)
    other, _ = tiny_models.conditioning("flux_dev", seed=4, tokens=5, batch=2)
    assert positive[0][0].shape == (2, 5, 1024) and negative[0][0].shape == (2, 9, 1024)
    assert positive[0][1]["pooled_output"].shape == (2, 768) and positive[0][1]["guidance"] == 3.5
    assert torch.equal(positive[0][0], again[0][0])
    assert not torch.equal(positive[0][0], other[0][0])


def test_empty_latent_shapes():
    assert tiny_models.empty_latent("flux_dev", 64, 96, batch=2)["samples"].shape == (2, 16, 12, 8)
    assert tiny_models.empty_latent("hunyuan_video", 64, 64, frames=9)["samples"].shape == (1, 16, 3, 8, 8)


def test_overriding_a_detection_forced_key_is_refused():
    with pytest.raises(ValueError, match="forced"):
        tiny_models.model_config("chroma", hidden_size=256)
