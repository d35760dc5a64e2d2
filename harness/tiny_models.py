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

import contextlib
import importlib
import json
import os
import sys
from dataclasses import dataclass, replace
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
    # config keys detection reads from the checkpoint's metadata "config" = {"transformer": {...}}, not the weights
    metadata_config: tuple = ()
    start_latent: Callable | None = None  # zero samples -> latent dict of the family's image-to-video latent node
    # num_heads = width // head_dim; None: the config itself sets the heads (under the family's own kwarg names)
    head_dim: int | None = HEAD_DIM
    learned_buffers: tuple = ()  # buffers that hold learned weights (saved, filled like parameters)
    text_mask: bool = False  # the model needs the text encoder's attention_mask (LTX-Video's T5)
    # detection knows the key layout but builds the full-size model whatever the weights say
    # (HiDream): load() takes the sizes from the file's own config instead
    sizes_in_file: bool = False
    constructor_kwargs: Callable | None = None  # config -> constructor kwargs, where the family nests them


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
    # Flux.1's own sizes (12B), for bench/gpu: built on the GPU, never written to a file
    "full": {"hidden_size": 3072, "depth": 19, "depth_single_blocks": 38, "context_in_dim": 4096, "dtype": "bfloat16"},
}
_TUNABLE = frozenset({"hidden_size", "depth", "depth_single_blocks", "context_in_dim", "dtype"})

# Wan 2.1 / 2.2 (WanModel). Detection fixes heads at dim // 128 and takes text_dim from the metadata
# "config" (else umT5's 4096): 1024 matches LotusConditioning, as for Flux.
_WAN_CONFIG = {
    "image_model": "wan2.1",
    "model_type": "t2v",
    "patch_size": (1, 2, 2),
    "in_dim": 16,
    "out_dim": 16,
    "text_dim": 1024,
    "freq_dim": 256,
    "window_size": (-1, -1),
    "qk_norm": True,
    "cross_attn_norm": True,
    "eps": 1e-6,
}
_WAN_SIZES = {
    "tiny": {"dim": 256, "ffn_dim": 512, "num_layers": 3, "dtype": "float32"},
    "bench": {"dim": 768, "ffn_dim": 3072, "num_layers": 8, "dtype": "bfloat16"},
}
_WAN_FRAMES = 5


def _wan_i2v_image(batch: int, seed: int, stream: int) -> dict:
    """What WanImageToVideo adds for one start image, the same to positive and negative: the
    image's VAE latent over all frames (random here, with _WAN_FRAMES pixel frames: sample i2v
    with that many; ComfyUI resizes height and width itself), a mask marking the first latent
    frame as given, and the CLIP vision output (ViT-H penultimate states, 257 x 1280)."""
    ensure_comfy()
    import comfy.clip_vision

    latent_frames = (_WAN_FRAMES - 1) // 4 + 1
    mask = torch.ones(1, 1, latent_frames, 4, 4)
    mask[:, :, 0] = 0.0
    clip_vision = comfy.clip_vision.Output()
    clip_vision.penultimate_hidden_states = _randn((batch, 257, 1280), seed, 11)
    return {"concat_latent_image": _randn((batch, 16, latent_frames, 4, 4), seed, 10), "concat_mask": mask,
            "clip_vision_output": clip_vision}


def _wan22_start_frame(samples: torch.Tensor) -> dict:
    """Wan22ImageToVideoLatent with a start image: the image's latent (random here) in the first
    latent frame and a noise_mask keeping it. ComfyUI's WAN22 turns the mask into per-frame
    timesteps (0 for the given frame) that the blocks apply as per-token modulation."""
    samples = samples.clone()
    samples[:, :, :1] = _randn(samples[:, :, :1].shape, 0, 12)
    mask = torch.ones(samples.shape[0], 1, *samples.shape[2:])
    mask[:, :, :1] = 0.0
    return {"samples": samples, "noise_mask": mask}


# SD3 / SD3.5 (MMDiT): detection derives everything from the weights; the width is 64 * depth
# with one 64-wide head per 64 (so no num_heads), as many joint blocks as depth, the last one's
# text side pre-only. No pos_embed buffer: the model then computes its sin-cos embedding.
_SD3_CONFIG = {
    "in_channels": 16,
    "out_channels": 16,
    "patch_size": 2,
    "input_size": None,
    "adm_in_channels": 2048,   # pooled CLIP-L + CLIP-G
    "context_in_dim": 1024,    # matches LotusConditioning, as for Flux (the real models take 4096)
    "qk_norm": "rms",          # SD3.5 (SD3 Medium has none)
    "pos_embed_scaling_factor": None,
    "x_block_self_attn_layers": [],
}
_SD3_SIZES = {
    "tiny": {"depth": 2, "dtype": "float32"},   # one joint block and the pre-only last one
    "bench": {"depth": 12, "dtype": "bfloat16"},
}


def _mmdit_kwargs(config: dict) -> dict:
    """MMDiT takes its text width inside context_embedder_config, projecting to the model width."""
    config = dict(config)
    params = {"in_features": config.pop("context_in_dim"), "out_features": 64 * config["depth"]}
    return {**config, "context_embedder_config": {"target": "torch.nn.Linear", "params": params}}


_PIXART_CONFIG = {
    "image_model": "pixart_sigma",
    "patch_size": 2,
    "in_channels": 4,
    "hidden_size": 1152,
    "caption_channels": 4096,
    "micro_condition": False,
}
_PIXART_SIZES = {
    "tiny": {"depth": 2, "model_max_length": 300, "dtype": "float32"},
    "bench": {"depth": 8, "model_max_length": 300, "dtype": "bfloat16"},
}
_PIXART_TUNABLE = frozenset({"depth", "model_max_length", "dtype"})


def _pixart_alpha_size(batch: int, seed: int, stream: int) -> dict:
    """What CLIPTextEncodePixArtAlpha adds: the image size for the micro-conditioning."""
    return {"width": 1024, "height": 1024}


# HiDream's text encoder passes the states of all 32 Llama 3.1 8B layers; block i reads layer
# llama_layers[i] (double blocks first; the real model: 0-31, then 31 for its last 16 blocks).
_HIDREAM_LLAMA_LAYERS = 32


def _hidream_llama(batch: int, seed: int, stream: int) -> dict:
    """What the HiDream text encoder adds besides T5 (cross_attn) and pooled CLIP-L + CLIP-G:
    the hidden states of all Llama 3.1 8B layers, [batch, 32, tokens, 4096]."""
    return {"conditioning_llama3": _randn((batch, _HIDREAM_LLAMA_LAYERS, 16, 4096), seed, stream + 20)}


_WAN_T2V = FamilySpec(
    model_class="comfy.ldm.wan.model.WanModel",
    config=_WAN_CONFIG,
    sizes=_WAN_SIZES,
    tunable=frozenset({"dim", "ffn_dim", "num_layers", "dtype"}),
    latent_format="Wan21",
    pooled_dim=None,
    guidance=None,
    default_cfg=5.0,
    default_frames=_WAN_FRAMES,
    hidden_key="dim",
    context_key="text_dim",
    metadata_config=("text_dim",),
)

_PIXART_SIGMA = FamilySpec(
    model_class="comfy.ldm.pixart.pixartms.PixArtMS",
    config=_PIXART_CONFIG,
    sizes=_PIXART_SIZES,
    tunable=_PIXART_TUNABLE,
    latent_format="SDXL",
    pooled_dim=None,
    guidance=None,
    default_cfg=4.5,
    context_key="caption_channels",
    head_dim=72,
    learned_buffers=("y_embedder.y_embedding",),
)

FAMILIES = {
    # Qwen-Image: detection reads only in_channels and the block count; everything else is the 20B
    # model's (24 heads of 128 = width 3072, Qwen2.5-VL text width 3584), so only depth can shrink.
    "qwen_image": FamilySpec(
        model_class="comfy.ldm.qwen_image.model.QwenImageTransformer2DModel",
        config={
            "image_model": "qwen_image",
            "patch_size": 2,
            "in_channels": 64,
            "out_channels": 16,
            "attention_head_dim": 128,
            "num_attention_heads": 24,
            "joint_attention_dim": 3584,
            "axes_dims_rope": [16, 56, 56],
        },
        sizes={
            "tiny": {"num_layers": 2, "dtype": "bfloat16"},
            "bench": {"num_layers": 6, "dtype": "bfloat16"},
        },
        tunable=frozenset({"num_layers", "dtype"}),
        latent_format="Wan21",
        pooled_dim=None,
        guidance=None,
        default_cfg=2.5,
        default_frames=1,
        context_key="joint_attention_dim",
        head_dim=None,
    ),
    # Lumina 2 (NextDiT): detection reads the width, the text width and the block count, and knows
    # head layouts only for width 2304 (Lumina Image 2.0: 24 heads, 8 KV heads) and 3840 (Z-Image);
    # two refiner blocks per stream are fixed.
    "lumina2": FamilySpec(
        model_class="comfy.ldm.lumina.model.NextDiT",
        config={
            "image_model": "lumina2",
            "patch_size": 2,
            "in_channels": 16,
            "dim": 2304,
            "cap_feat_dim": 1024,   # matches LotusConditioning (Gemma 2 2B gives 2304)
            "qk_norm": True,
            "n_heads": 24,
            "n_kv_heads": 8,
            "axes_dims": [32, 32, 32],
            "axes_lens": [300, 512, 512],
            "rope_theta": 10000.0,
            "ffn_dim_multiplier": 4.0,
        },
        sizes={
            "tiny": {"n_layers": 2, "dtype": "bfloat16"},
            "bench": {"n_layers": 8, "dtype": "bfloat16"},
        },
        tunable=frozenset({"n_layers", "cap_feat_dim", "dtype"}),
        latent_format="Flux",
        pooled_dim=None,
        guidance=None,
        default_cfg=4.0,
        hidden_key="dim",
        context_key="cap_feat_dim",
        head_dim=None,
    ),
    # HiDream-I1: detection reads no size from the weights and would build the 17B model, so the
    # tiny one keeps its own sizes (sizes_in_file). Text widths are the real ones: T5 4096 and
    # Llama 4096 (caption_channels), pooled CLIP-L + CLIP-G 2048.
    "hidream": FamilySpec(
        model_class="comfy.ldm.hidream.model.HiDreamImageTransformer2DModel",
        config={
            "image_model": "hidream",
            "patch_size": 2,
            "in_channels": 16,
            "out_channels": 16,
            "attention_head_dim": 128,
            "axes_dims_rope": [64, 32, 32],
            "caption_channels": [4096, 4096],
            "text_emb_dim": 2048,
            "max_resolution": [128, 128],
            "num_routed_experts": 4,
            "num_activated_experts": 2,
        },
        sizes={
            "tiny": {"num_attention_heads": 2, "num_layers": 2, "num_single_layers": 2,
                     "llama_layers": [0, 1, 31, 31], "dtype": "float32"},
            "bench": {"num_attention_heads": 6, "num_layers": 4, "num_single_layers": 8,
                      "llama_layers": [0, 1, 2, 3] + [31] * 8, "dtype": "bfloat16"},
        },
        tunable=frozenset({"num_attention_heads", "dtype"}),
        latent_format="Flux",
        pooled_dim=2048,
        guidance=None,
        default_cfg=5.0,
        context_key="caption_channels",
        head_dim=None,
        extra_conditioning=_hidream_llama,
        sizes_in_file=True,
    ),
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
    # Flux 2 (Klein layout: no guidance embedding): shared modulation for all blocks, 128-channel
    # latent, patch 1; ComfyUI pads the text to 512 tokens. Its reference images can be put at
    # timestep zero ("index_timestep_zero"), which Flux.1's per-block modulation cannot run.
    "flux2": FamilySpec(
        model_class="comfy.ldm.flux.model.Flux",
        config={
            "image_model": "flux2",
            "in_channels": 128,
            "out_channels": 128,
            "vec_in_dim": None,
            "context_in_dim": 1024,
            "mlp_ratio": 3.0,
            "axes_dim": [32, 32, 32, 32],
            "theta": 2000,
            "patch_size": 1,
            "qkv_bias": False,
            "guidance_embed": False,
            "txt_ids_dims": [3],
            "global_modulation": True,
            "mlp_silu_act": True,
            "ops_bias": False,
            "default_ref_method": "index",
            "ref_index_scale": 10.0,
            "yak_mlp": False,
            "txt_norm": False,
        },
        sizes=_FLUX_SIZES,
        tunable=_TUNABLE,
        latent_format="Flux2",
        pooled_dim=None,
        guidance=None,
        default_cfg=4.0,
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

    # Wan 2.1 / 2.2 14B text-to-video layout (also each model of 2.2's high/low-noise pair).
    "wan_t2v": _WAN_T2V,
    # Wan 2.1 image-to-video: image latent + mask concatenated to the input (16 + 4 + 16
    # channels), CLIP vision tokens through img_emb into the i2v cross-attention.
    "wan_i2v": replace(_WAN_T2V, config={**_WAN_CONFIG, "model_type": "i2v", "in_dim": 36},
                       extra_conditioning=_wan_i2v_image),
    # Wan 2.2 TI2V 5B: 48-channel latent (16x spatial), start frame kept through per-frame timesteps.
    "wan22_ti2v": replace(_WAN_T2V, config={**_WAN_CONFIG, "in_dim": 48, "out_dim": 48}, latent_format="Wan22",
                          start_latent=_wan22_start_frame),
    # PixArt-Sigma (PixArtMS). Detection fixes the width (1152, 16 heads of 72), 4 latent channels
    # and the T5 text width (4096: not read from the weights, no metadata override); the depth and
    # the text length (y_embedding rows) are free. Latents under 33 x 33 make PixArtMS's position
    # embedding NaN (its interpolation rounds to 0): sample at 272 x 272 pixels or more.
    "pixart_sigma": _PIXART_SIGMA,
    # PixArt-alpha: the same model plus size and aspect-ratio embedders (micro-conditioning), which
    # is how detection tells it from Sigma.
    "pixart_alpha": replace(_PIXART_SIGMA, config={**_PIXART_CONFIG, "image_model": "pixart_alpha", "micro_condition": True},
                            latent_format="SD15", extra_conditioning=_pixart_alpha_size),
    # LTX-Video (LTXVModel). Detection fixes 32 heads (head size = attn2 width // 32), 128 latent
    # channels (patch 1) and takes the text width from the metadata "config" (else T5's 4096): 1024
    # matches LotusConditioning. The model width is 32 x head size and equals cross_attention_dim.
    "ltxv": FamilySpec(
        model_class="comfy.ldm.lightricks.model.LTXVModel",
        config={"image_model": "ltxv", "in_channels": 128, "num_attention_heads": 32, "caption_channels": 1024},
        sizes={
            "tiny": {"attention_head_dim": 8, "cross_attention_dim": 256, "num_layers": 2, "dtype": "float32"},
            "bench": {"attention_head_dim": 32, "cross_attention_dim": 1024, "num_layers": 8, "dtype": "bfloat16"},
        },
        tunable=frozenset({"num_layers", "dtype"}),
        latent_format="LTXV",
        pooled_dim=None,
        guidance=None,
        default_cfg=3.0,
        default_frames=9,
        hidden_key="cross_attention_dim",
        context_key="caption_channels",
        metadata_config=("caption_channels",),
        head_dim=None,
        text_mask=True,
    ),
    # SD3.5 Large layout (SD3 Medium: the same without qk norm).
    "sd3": FamilySpec(
        model_class="comfy.ldm.modules.diffusionmodules.mmdit.OpenAISignatureMMDITWrapper",
        config=_SD3_CONFIG,
        sizes=_SD3_SIZES,
        tunable=frozenset({"depth", "dtype"}),
        latent_format="SD3",
        pooled_dim=2048,
        guidance=None,
        default_cfg=4.5,
        head_dim=None,
        constructor_kwargs=_mmdit_kwargs,
    ),
    # SD3.5 Medium: a second, image-only self-attention in the image half of its first 13 blocks
    # (here in every block).
    "sd35_medium": FamilySpec(
        model_class="comfy.ldm.modules.diffusionmodules.mmdit.OpenAISignatureMMDITWrapper",
        config={**_SD3_CONFIG, "x_block_self_attn": True},
        sizes=_SD3_SIZES,
        tunable=frozenset({"depth", "dtype"}),
        latent_format="SD3",
        pooled_dim=2048,
        guidance=None,
        default_cfg=4.5,
        head_dim=None,
        constructor_kwargs=_mmdit_kwargs,
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
    if spec.head_dim is not None:
        if config[spec.hidden_key] % spec.head_dim:
            raise ValueError(f"{family}: {spec.hidden_key} must be a multiple of {spec.head_dim}")
        config["num_heads"] = config[spec.hidden_key] // spec.head_dim
    return config


def _import(dotted: str):
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _randomize_(model: torch.nn.Module, seed: int, buffers: tuple = (), device: str = "cpu") -> None:
    """Refill every parameter, then the named buffers, from one seeded stream on `device`.

    Nothing keeps its usual zero/identity init: zero-initialised gates and modulations would
    make whole blocks no-ops. Fan-in-scaled normals keep activations O(1) through the blocks.
    """
    generator = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, param in (*model.named_parameters(), *((name, model.get_buffer(name)) for name in buffers)):
            if param.ndim >= 2:
                mean, std = 0.0, param[0].numel() ** -0.5
            elif name.endswith("bias"):
                mean, std = 0.0, 0.02
            else:  # norm scales
                mean, std = 1.0, 0.1
            # Drawn in float32 whatever the save dtype: normal_ is several times slower in bfloat16.
            param.copy_(torch.empty(param.shape, device=device).normal_(mean, std, generator=generator))


def build_state_dict(family: str, seed: int = 0, size: str = "tiny", device: str = "cpu", **overrides) -> dict:
    """Random weights for one family, keyed the way ComfyUI saves that family, made on
    `device` (a full-size model straight on a GPU; the same seed draws other values there)."""
    ensure_comfy()
    config = model_config(family, size, **overrides)
    dtype = getattr(torch, config.pop("dtype"))
    spec = _spec(family)
    if spec.constructor_kwargs is not None:
        config = spec.constructor_kwargs(config)
    model_class = _import(spec.model_class)
    # Built on the meta device with plain torch.nn ops: no time spent on an init we replace.
    model = model_class(**config, dtype=dtype, device="meta", operations=torch.nn)
    model.to_empty(device=device)
    unset = set(model.state_dict()) - {name for name, _ in model.named_parameters()} - set(spec.learned_buffers)
    if unset:
        raise RuntimeError(f"{family}: buffers {sorted(unset)} in the state dict would be saved uninitialised")
    _randomize_(model, seed, spec.learned_buffers, device)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def _metadata(family: str, seed: int, size: str, overrides: dict) -> dict:
    description = {
        "format": FORMAT_VERSION,
        "family": family,
        "seed": seed,
        "config": model_config(family, size, **overrides),
    }
    # One key only: safetensors does not promise an order for several metadata entries.
    metadata_config = _spec(family).metadata_config
    if not metadata_config:
        return {METADATA_KEY: json.dumps(description, sort_keys=True)}
    # ComfyUI reads "config" for keys it cannot derive from the weights; the description rides along.
    transformer = {key: description["config"][key] for key in metadata_config}
    return {"config": json.dumps({"transformer": transformer, METADATA_KEY: description}, sort_keys=True)}


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

    if _spec(family).sizes_in_file:
        patcher = _load_with_own_sizes(path)
    else:
        patcher = comfy.sd.load_diffusion_model(str(path))
    expected = _import(_spec(family).model_class)
    detected = type(patcher.model.diffusion_model)
    if detected is not expected:
        raise RuntimeError(f"{path}: ComfyUI detected {detected.__name__}, expected {expected.__name__} for {family}")
    return patcher


def _load_with_own_sizes(path):
    """comfy.sd.load_diffusion_model's path, except that the config detection derives from the
    keys gets the sizes saved in the file's metadata (detection alone would build the full model)."""
    import comfy.model_detection
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.utils

    state_dict, metadata = comfy.utils.load_torch_file(str(path), return_metadata=True)
    sizes = json.loads(metadata[METADATA_KEY])["config"]
    sizes.pop("dtype")
    model_config = comfy.model_detection.model_config_from_unet_config(
        {**comfy.model_detection.detect_unet_config(state_dict, ""), **sizes}, state_dict)
    load_device = mm.get_torch_device()
    unet_dtype = mm.unet_dtype(model_params=comfy.utils.calculate_parameters(state_dict),
                               supported_dtypes=model_config.supported_inference_dtypes,
                               weight_dtype=comfy.utils.weight_dtype(state_dict))
    manual_cast_dtype = mm.unet_manual_cast(unet_dtype, load_device, model_config.supported_inference_dtypes)
    model_config.set_inference_dtype(unet_dtype, manual_cast_dtype, device=load_device)
    model = model_config.get_model(state_dict, "")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=mm.unet_offload_device())
    model.load_model_weights(state_dict, "")
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
    if isinstance(context_dim, (list, tuple)):   # HiDream's caption_channels: [T5 width, Llama width]
        context_dim = context_dim[0]

    def one(length: int, stream: int):
        extra = {}
        if spec.pooled_dim is not None:
            extra["pooled_output"] = _randn((batch, spec.pooled_dim), seed, stream + 1)
        if spec.guidance is not None:
            extra["guidance"] = spec.guidance
        if spec.extra_conditioning is not None:
            extra.update(spec.extra_conditioning(batch, seed, stream))
        if spec.text_mask:
            # the last quarter is padding, as a T5 encoder pads a short prompt
            extra["attention_mask"] = (torch.arange(length) < length - length // 4).int().expand(batch, length)
        return [[_randn((batch, length, context_dim), seed, stream), extra]]

    return one(tokens, 0), one(tokens if neg_tokens is None else neg_tokens, 2)


def empty_latent(family: str, width: int, height: int, batch: int = 1, frames: int | None = None) -> dict:
    """Zero latent shaped like the family's empty-latent node makes it (`frames` in pixel frames);
    for a family with `start_latent`, what its image-to-video latent node makes from a start image."""
    ensure_comfy()
    import comfy.latent_formats

    spec = _spec(family)
    fmt = getattr(comfy.latent_formats, spec.latent_format)
    down = fmt.spacial_downscale_ratio
    shape = [batch, fmt.latent_channels, height // down, width // down]
    if fmt.latent_dimensions == 3:
        frames = frames or spec.default_frames
        shape.insert(2, (frames - 1) // fmt.temporal_downscale_ratio + 1)
    if spec.start_latent is not None:
        return spec.start_latent(torch.zeros(shape))
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


@contextlib.contextmanager
def split_cfg(model_patcher):
    """While inside: ComfyUI finds no room to batch, so it runs cond and uncond one at a time."""
    usual = model_patcher.model.memory_usage_factor
    model_patcher.model.memory_usage_factor = 1e15
    try:
        yield
    finally:
        model_patcher.model.memory_usage_factor = usual


def failing_clone(model_patcher):
    """A clone of `model_patcher` whose every model call raises RuntimeError("boom")."""
    def explode(*args, **kwargs):
        raise RuntimeError("boom")
    broken = model_patcher.clone()
    broken.set_model_unet_function_wrapper(explode)
    return broken
