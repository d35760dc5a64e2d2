"""Tiny random-weight diffusion-transformer checkpoints that ComfyUI loads as the real thing.

Each family is saved as a safetensors file in that family's own ComfyUI key layout, so
`comfy.sd.load_diffusion_model(path)` detects it through ComfyUI's own model detection and
returns a normal ModelPatcher. Weights are random but seeded (same seed -> bit-identical file
on a given machine; torch's CPU normal_ kernel may differ between CPU types) and large enough
that the model output depends on its input, so caching and sampling tests see real differences.

ComfyUI is imported lazily inside the functions that need it, after `ensure_comfy()`:
unless comfy is already imported, that puts the ComfyUI tree on sys.path (argument, else
$DTC_COMFYUI, else <repo>/.dtc/ComfyUI) and sets `args.cpu = True` before any other comfy
module is imported. Inside a running ComfyUI nothing is changed.

Adding a family (Wan, SD3, Qwen-Image, PixArt...) means adding one FamilySpec to FAMILIES:
the constructor kwargs that ComfyUI's model_detection derives back from the weights, the size
presets, and what its conditioning and latents look like.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from dataclasses import dataclass
from typing import Callable
from pathlib import Path

import torch

DEFAULT_COMFYUI = Path(__file__).resolve().parents[1] / ".dtc" / "ComfyUI"
# Bump when the weight layout or init changes, so cached files are rebuilt.
FORMAT_VERSION = 2
METADATA_KEY = "dtc_tiny_model"
# model_detection derives num_heads as hidden_size // 128 for these families.
HEAD_DIM = 128


@dataclass(frozen=True)
class FamilySpec:
    model_class: str  # dotted path of the diffusion model class ComfyUI should detect
    config: dict  # constructor kwargs that model_detection derives back from the weights
    sizes: dict  # size name -> values for the tunable keys
    tunable: frozenset  # keys callers may override; every other key is forced by detection
    latent_format: str  # class name in comfy.latent_formats
    pooled_dim: int | None  # width of pooled_output, None if the family takes none
    guidance: float | None  # distilled guidance put into the conditioning
    default_cfg: float
    default_frames: int | None = None  # pixel frames of a video latent
    hidden_key: str = "hidden_size"  # constructor kwarg of the model width (num_heads = width // HEAD_DIM)
    context_key: str = "context_in_dim"  # constructor kwarg of the text-conditioning width
    extra_conditioning: Callable | None = None  # (batch, seed, stream) -> extra conditioning entries


_FLUX_CONFIG = {
    "image_model": "flux",
    "in_channels": 16,
    "out_channels": 16,
    "vec_in_dim": 768,
    # 1024 matches ComfyUI's LotusConditioning output ([1, 77, 1024]), usable without a text encoder.
    "context_in_dim": 1024,
    "mlp_ratio": 4.0,
    "axes_dim": [16, 56, 56],
    "theta": 10000,
    "patch_size": 2,
    "qkv_bias": True,
    "txt_ids_dims": [],
}
_FLUX_SIZES = {
    "tiny": {"hidden_size": 256, "depth": 2, "depth_single_blocks": 2, "dtype": "float32"},
    "bench": {"hidden_size": 768, "depth": 4, "depth_single_blocks": 8, "dtype": "bfloat16"},
}
_TUNABLE = frozenset({"hidden_size", "depth", "depth_single_blocks", "context_in_dim", "dtype"})

FAMILIES = {
    "flux_dev": FamilySpec(
        model_class="comfy.ldm.flux.model.Flux",
        config={**_FLUX_CONFIG, "guidance_embed": True},
        sizes=_FLUX_SIZES,
        tunable=_TUNABLE,
        latent_format="Flux",
        pooled_dim=768,
        guidance=3.5,
        default_cfg=1.0,
    ),
    "flux_schnell": FamilySpec(
        model_class="comfy.ldm.flux.model.Flux",
        config={**_FLUX_CONFIG, "guidance_embed": False},
        sizes=_FLUX_SIZES,
        tunable=_TUNABLE,
        latent_format="Flux",
        pooled_dim=768,
        guidance=None,
        default_cfg=1.0,
    ),
    # Detection pins the modulation approximator (64 -> 5120 x 5 layers -> 3072) and the
    # modulation width must equal hidden_size, so Chroma cannot shrink below hidden 3072;
    # only the block counts and the text width are free.
    "chroma": FamilySpec(
        model_class="comfy.ldm.chroma.model.Chroma",
        config={
            "image_model": "chroma",
            "in_channels": 64,
            "out_channels": 64,
            "context_in_dim": 1024,
            "hidden_size": 3072,
            "mlp_ratio": 4.0,
            "axes_dim": [16, 56, 56],
            "theta": 10000,
            "patch_size": 2,
            "qkv_bias": True,
            "in_dim": 64,
            "out_dim": 3072,
            "hidden_dim": 5120,
            "n_layers": 5,
            "txt_ids_dims": [],
            "vec_in_dim": None,
        },
        sizes={
            "tiny": {"depth": 1, "depth_single_blocks": 1, "dtype": "bfloat16"},
            "bench": {"depth": 2, "depth_single_blocks": 4, "dtype": "bfloat16"},
        },
        tunable=frozenset({"depth", "depth_single_blocks", "context_in_dim", "dtype"}),
        latent_format="Flux",
        pooled_dim=None,
        guidance=None,
        default_cfg=4.0,
    ),
    "hunyuan_video": FamilySpec(
        model_class="comfy.ldm.hunyuan_video.model.HunyuanVideo",
        config={
            "image_model": "hunyuan_video",
            "in_channels": 16,
            "out_channels": 16,
            "patch_size": [1, 2, 2],
            "vec_in_dim": 768,
            "context_in_dim": 256,
            "mlp_ratio": 4.0,
            "axes_dim": [16, 56, 56],
            "theta": 256,
            "qkv_bias": True,
            "guidance_embed": True,
            "byt5": False,
            "meanflow": False,
            "use_cond_type_embedding": False,
            "vision_in_dim": None,
            "meanflow_sum": False,
        },
        sizes={
            "tiny": {"hidden_size": 256, "depth": 2, "depth_single_blocks": 2, "dtype": "float32"},
            "bench": {"hidden_size": 768, "depth": 4, "depth_single_blocks": 8, "dtype": "bfloat16"},
        },
        tunable=_TUNABLE,
        latent_format="HunyuanVideo",
        pooled_dim=768,
        guidance=6.0,
        default_cfg=1.0,
        default_frames=5,
    ),

    # Wan 2.1 / 2.2 14B layout; detection fixes the text width at 4096 (umT5) and heads at dim // 128.
    "wan_t2v": FamilySpec(
        model_class="comfy.ldm.wan.model.WanModel",
        config={
            "image_model": "wan2.1",
            "model_type": "t2v",
            "patch_size": (1, 2, 2),
            "in_dim": 16,
            "out_dim": 16,
            "text_dim": 4096,
            "freq_dim": 256,
            "window_size": (-1, -1),
            "qk_norm": True,
            "cross_attn_norm": True,
            "eps": 1e-6,
        },
        sizes={
            "tiny": {"dim": 256, "ffn_dim": 512, "num_layers": 3, "dtype": "float32"},
            "bench": {"dim": 768, "ffn_dim": 3072, "num_layers": 8, "dtype": "bfloat16"},
        },
        tunable=frozenset({"dim", "ffn_dim", "num_layers", "dtype"}),
        latent_format="Wan21",
        pooled_dim=None,
        guidance=None,
        default_cfg=5.0,
        default_frames=5,
        hidden_key="dim",
        context_key="text_dim",
    ),
}


def ensure_comfy(comfy_path=None) -> Path:
    """Make ComfyUI importable, on CPU; returns the root of the ComfyUI tree in use.

    If comfy is already imported (inside ComfyUI, or a conftest set it up) its tree and
    device settings are left alone.
    """
    if "comfy" not in sys.modules:
        path = Path(comfy_path or os.environ.get("DTC_COMFYUI") or DEFAULT_COMFYUI).resolve()
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
        # Must happen before comfy.model_management is imported: it picks the device on import.
        from comfy.cli_args import args

        args.cpu = True
    return Path(sys.modules["comfy"].__path__[0]).parent


def _spec(family: str) -> FamilySpec:
    try:
        return FAMILIES[family]
    except KeyError:
        raise ValueError(f"unknown family {family!r}; known: {sorted(FAMILIES)}") from None


def model_config(family: str, size: str = "tiny", **overrides) -> dict:
    """Constructor kwargs (plus "dtype") for one family at one size."""
    spec = _spec(family)
    if size not in spec.sizes:
        raise ValueError(f"unknown size {size!r} for {family}; known: {sorted(spec.sizes)}")
    fixed = set(overrides) - spec.tunable
    if fixed:
        raise ValueError(
            f"{family}: {sorted(fixed)} are forced by ComfyUI's detection; tunable: {sorted(spec.tunable)}"
        )
    config = {**spec.config, **spec.sizes[size], **overrides}
    if config[spec.hidden_key] % HEAD_DIM:
        raise ValueError(f"{family}: {spec.hidden_key} must be a multiple of {HEAD_DIM}")
    config["num_heads"] = config[spec.hidden_key] // HEAD_DIM
    return config


def _import(dotted: str):
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _randomize_(model: torch.nn.Module, seed: int) -> None:
    """Refill every parameter from one seeded stream.

    Nothing keeps its usual zero/identity init: zero-initialised gates and modulations would
    make whole blocks no-ops. Fan-in-scaled normals keep activations O(1) through the blocks.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2:
                mean, std = 0.0, param[0].numel() ** -0.5
            elif name.endswith("bias"):
                mean, std = 0.0, 0.02
            else:  # norm scales
                mean, std = 1.0, 0.1
            # Drawn in float32 whatever the save dtype: normal_ is several times slower in bfloat16.
            param.copy_(torch.empty(param.shape).normal_(mean, std, generator=generator))


def build_state_dict(family: str, seed: int = 0, size: str = "tiny", **overrides) -> dict:
    """Random weights for one family, keyed the way ComfyUI saves that family."""
    ensure_comfy()
    config = model_config(family, size, **overrides)
    dtype = getattr(torch, config.pop("dtype"))
    model_class = _import(_spec(family).model_class)
    # Built on the meta device with plain torch.nn ops: no time spent on an init we replace.
    model = model_class(**config, dtype=dtype, device="meta", operations=torch.nn)
    model.to_empty(device="cpu")
    if len(model.state_dict()) != len(list(model.parameters())):
        raise RuntimeError(f"{family}: buffers in the state dict would be saved uninitialised")
    _randomize_(model, seed)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def _metadata(family: str, seed: int, size: str, overrides: dict) -> dict:
    description = {
        "format": FORMAT_VERSION,
        "family": family,
        "seed": seed,
        "config": model_config(family, size, **overrides),
    }
    # One key only: safetensors does not promise an order for several metadata entries.
    return {METADATA_KEY: json.dumps(description, sort_keys=True)}


def build_checkpoint(family: str, path, seed: int = 0, size: str = "tiny", **overrides) -> Path:
    """Write the checkpoint to `path` unless a file built with the same config is already there."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = Path(path)
    metadata = _metadata(family, seed, size, overrides)
    if path.exists():
        with safe_open(str(path), "pt") as existing:
            if existing.metadata() == metadata:
                return path
    state_dict = build_state_dict(family, seed, size, **overrides)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so a concurrent reader never sees a half-written file.
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    save_file(state_dict, str(partial), metadata=metadata)
    os.replace(partial, path)
    return path


def load(family: str, path):
    """ModelPatcher via ComfyUI's own detection; fails if it detects another model class."""
    ensure_comfy()
    import comfy.sd

    patcher = comfy.sd.load_diffusion_model(str(path))
    expected = _import(_spec(family).model_class)
    detected = type(patcher.model.diffusion_model)
    if detected is not expected:
        raise RuntimeError(f"{path}: ComfyUI detected {detected.__name__}, expected {expected.__name__} for {family}")
    return patcher


def _randn(shape, seed: int, stream: int) -> torch.Tensor:
    # Separate streams so e.g. the negative does not change when the positive's length does.
    generator = torch.Generator().manual_seed(seed * 1000 + stream)
    return torch.randn(shape, generator=generator)


def conditioning(
    family: str,
    model_patcher=None,
    seed: int = 0,
    tokens: int = 16,
    neg_tokens: int | None = None,
    batch: int = 1,
):
    """(positive, negative) in ComfyUI's conditioning format, deterministic from `seed`.

    The text width comes from `model_patcher` when given (checkpoints built with another
    context_in_dim), else from the family's default. Give `neg_tokens` != `tokens` to stop
    ComfyUI from batching cond and uncond together.
    """
    spec = _spec(family)
    context_dim = spec.config[spec.context_key]
    if model_patcher is not None:
        context_dim = model_patcher.model.model_config.unet_config.get(spec.context_key, context_dim)

    def one(length: int, stream: int):
        extra = {}
        if spec.pooled_dim is not None:
            extra["pooled_output"] = _randn((batch, spec.pooled_dim), seed, stream + 1)
        if spec.guidance is not None:
            extra["guidance"] = spec.guidance
        if spec.extra_conditioning is not None:
            extra.update(spec.extra_conditioning(batch, seed, stream))
        return [[_randn((batch, length, context_dim), seed, stream), extra]]

    return one(tokens, 0), one(tokens if neg_tokens is None else neg_tokens, 2)


def empty_latent(family: str, width: int, height: int, batch: int = 1, frames: int | None = None) -> dict:
    """Zero latent shaped like the family's empty-latent node makes it (`frames` in pixel frames)."""
    ensure_comfy()
    import comfy.latent_formats

    spec = _spec(family)
    fmt = getattr(comfy.latent_formats, spec.latent_format)
    down = fmt.spacial_downscale_ratio
    shape = [batch, fmt.latent_channels, height // down, width // down]
    if fmt.latent_dimensions == 3:
        frames = frames or spec.default_frames
        shape.insert(2, (frames - 1) // fmt.temporal_downscale_ratio + 1)
    return {"samples": torch.zeros(shape)}


def sample(
    model_patcher,
    family: str,
    steps: int = 4,
    seed: int = 0,
    cfg: float | None = None,
    sampler: str = "euler",
    scheduler: str = "simple",
    width: int = 64,
    height: int = 64,
    denoise: float = 1.0,
    latent: dict | None = None,
    positive=None,
    negative=None,
    frames: int | None = None,
) -> torch.Tensor:
    """Run ComfyUI's real KSampler path (nodes.common_ksampler); returns the output latent."""
    ensure_comfy()
    import nodes

    if latent is None:
        latent = empty_latent(family, width, height, frames=frames)
    if positive is None or negative is None:
        default_positive, default_negative = conditioning(family, model_patcher)
        positive = default_positive if positive is None else positive
        negative = default_negative if negative is None else negative
    cfg = _spec(family).default_cfg if cfg is None else cfg
    (out,) = nodes.common_ksampler(
        model_patcher, seed, steps, cfg, sampler, scheduler, positive, negative, latent, denoise=denoise
    )
    return out["samples"]
