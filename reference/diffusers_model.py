"""The shipped reference model as a diffusers FluxTransformer2DModel, and the
sampling loop that reproduces ComfyUI's samples with it (flow-matching Euler
on ComfyUI's "simple" sigmas, CFG on the two predictions).

The conversion is exact, made in memory from the shipped ComfyUI-format file
(nothing is stored twice): the model has no pooled text vector, so diffusers'
pooled-projection embedder gets zero weights and zero inputs (it adds exactly
0 to the timestep embedding). Needs diffusers (a dev requirement); the pack
itself never imports it. Imported as dit_token_cache.reference (harness/pack_loader.py):
the block layouts come from the pack's dit_token_cache.diffusers.flux_layers.

    python scripts/convert_reference_to_diffusers.py --out DIR   # save_pretrained() of it
"""
import json

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..diffusers.flux_layers import BLOCK_PATHS, convert_block
from .model import MODEL_FILE, label_encoder

POOLED_DIM = 1   # the pooled-projection embedder diffusers always has: zero weights, zero input
SIGMA_TABLE = 1000   # ComfyUI's discrete-flow sigma table for this model (shift 1.0): sigma = t


def model_config(path=MODEL_FILE) -> dict:
    with safe_open(str(path), "pt") as weights:
        return json.loads(weights.metadata()["dit_token_cache_reference"])["model"]


def diffusers_config(config: dict) -> dict:
    """FluxTransformer2DModel's config for a ComfyUI Flux config."""
    if config["vec_in_dim"] is not None or config["guidance_embed"] or config["mlp_ratio"] != 4.0:
        raise ValueError("converts Flux models without a pooled vector or guidance, mlp_ratio 4 (the reference model)")
    return dict(patch_size=1, in_channels=config["in_channels"] * config["patch_size"] ** 2,
                num_layers=config["depth"], num_single_layers=config["depth_single_blocks"],
                attention_head_dim=config["hidden_size"] // config["num_heads"],
                num_attention_heads=config["num_heads"], joint_attention_dim=config["context_in_dim"],
                pooled_projection_dim=POOLED_DIM, guidance_embeds=False, axes_dims_rope=tuple(config["axes_dim"]))


def _linear(out: dict, source: dict, comfy_name: str, diffusers_name: str) -> None:
    for part in ("weight", "bias"):
        out[f"{diffusers_name}.{part}"] = source[f"{comfy_name}.{part}"]


def _blocks(out: dict, source: dict, comfy_group: str, count: int, kind: str, hidden: int, mlp: int) -> None:
    """Every block of a group through the pack's table of the two Flux layouts (flux_layers)."""
    for i in range(count):
        prefix = f"{comfy_group}.{i}."
        block = {name[len(prefix):]: tensor for name, tensor in source.items() if name.startswith(prefix)}
        ours = f"{BLOCK_PATHS[comfy_group]}.{i}."
        out.update({ours + name: tensor for name, tensor in convert_block(block, kind, hidden, mlp).items()})


def convert_state_dict(source: dict, config: dict) -> dict:
    """ComfyUI (BFL) Flux keys -> diffusers FluxTransformer2DModel keys, tensors unchanged
    but for the fused projections split and the final modulation's (shift, scale) swapped."""
    hidden = config["hidden_size"]
    mlp = int(hidden * config["mlp_ratio"])
    out = {}
    _linear(out, source, "img_in", "x_embedder")
    _linear(out, source, "txt_in", "context_embedder")
    _linear(out, source, "time_in.in_layer", "time_text_embed.timestep_embedder.linear_1")
    _linear(out, source, "time_in.out_layer", "time_text_embed.timestep_embedder.linear_2")
    _blocks(out, source, "double_blocks", config["depth"], "double", hidden, mlp)
    _blocks(out, source, "single_blocks", config["depth_single_blocks"], "single", hidden, mlp)
    _linear(out, source, "final_layer.linear", "proj_out")
    for part in ("weight", "bias"):
        shift, scale = source[f"final_layer.adaLN_modulation.1.{part}"].chunk(2, dim=0)
        out[f"norm_out.linear.{part}"] = torch.cat([scale, shift], dim=0)   # diffusers reads (scale, shift)
    for layer, shape in (("linear_1", (hidden, POOLED_DIM)), ("linear_2", (hidden, hidden))):
        out[f"time_text_embed.text_embedder.{layer}.weight"] = torch.zeros(shape)
        out[f"time_text_embed.text_embedder.{layer}.bias"] = torch.zeros(hidden)
    return out


def load_reference_transformer(path=MODEL_FILE):
    """The reference model as a float32 diffusers FluxTransformer2DModel on the CPU, in eval mode."""
    from diffusers import FluxTransformer2DModel
    config = model_config(path)
    transformer = FluxTransformer2DModel(**diffusers_config(config))
    transformer.load_state_dict(convert_state_dict(load_file(str(path)), config), strict=True)
    return transformer.eval().requires_grad_(False)


def simple_sigmas(steps: int, table: int = SIGMA_TABLE) -> torch.Tensor:
    """ComfyUI's "simple" schedule for this model: `steps` evenly spaced picks,
    from the top, of its table of sigmas t = k / table, then 0."""
    picks = [(table - int(i * table / steps)) / table for i in range(steps)]
    return torch.tensor(picks + [0.0])


def pack(latent: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H/2 * W/2, C * 4], the 2x2 patches diffusers' Flux takes."""
    b, c, h, w = latent.shape
    return latent.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    b, _, d = tokens.shape
    c = d // 4
    return tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)


def image_ids(height: int, width: int) -> torch.Tensor:
    """(0, row, column) of each 2x2 patch: the positions ComfyUI's Flux gives image tokens."""
    rows, cols = torch.meshgrid(torch.arange(height // 2), torch.arange(width // 2), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()


def predict(transformer, x: torch.Tensor, sigma: float, context: torch.Tensor) -> torch.Tensor:
    """The velocity the model predicts for latents x [B, C, H, W] at `sigma` (a number, or one a sample), text `context` [B, L, D]."""
    b, _, h, w = x.shape
    out = transformer(hidden_states=pack(x), encoder_hidden_states=context,
                      pooled_projections=torch.zeros(b, POOLED_DIM, dtype=x.dtype, device=x.device),
                      timestep=torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(b),
                      img_ids=image_ids(h, w).to(x.device), txt_ids=torch.zeros(context.shape[1], 3, device=x.device),
                      return_dict=False)[0]
    return unpack(out, h, w)


def sample(transformer, noise: torch.Tensor, labels: torch.Tensor, steps: int = 20, cfg: float = 4.0) -> torch.Tensor:
    """Flow-matching Euler from pure noise (sigma 1) on simple_sigmas, CFG
    between the labels and the unconditional labels: ComfyUI's KSampler with
    euler / simple on the reference model, in the model's latent space."""
    encoder = label_encoder()
    with torch.no_grad():
        cond, uncond = encoder(labels), encoder(encoder.null_labels(labels.shape[0]))
        sigmas = simple_sigmas(steps).tolist()
        x = noise * sigmas[0]
        for sigma, following in zip(sigmas, sigmas[1:]):
            velocity = predict(transformer, torch.cat([x, x]), sigma, torch.cat([cond, uncond]))
            v_cond, v_uncond = velocity.chunk(2)
            x = x + (v_uncond + cfg * (v_cond - v_uncond)) * (following - sigma)
    return x
