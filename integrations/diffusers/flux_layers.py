"""Flux's blocks in the two layouts: ComfyUI's (Black Forest Labs' names,
fused qkv and single-block linear1) and diffusers' FluxTransformer2DModel
(one linear layer per projection). One table serves the weight conversion
(a first-block predictor's block, the reference model) and the mapping of a
TokenCache predictor's LoRA adapters: a fused layer's output rows are split,
in order, over the diffusers layers it became."""
from typing import Dict, List, Optional, Tuple

import torch

BLOCK_PATHS = {"double_blocks": "transformer_blocks", "single_blocks": "single_transformer_blocks"}
COMFY_PATHS = {ours: comfy for comfy, ours in BLOCK_PATHS.items()}
KINDS = {"transformer_blocks": "double", "single_transformer_blocks": "single"}   # diffusers group -> ComfyUI's block kind

Parts = List[Tuple[str, Optional[slice]]]   # (diffusers layer, its rows of the ComfyUI layer's output; None: all)


def _split(names, sizes) -> Parts:
    parts, start = [], 0
    for name, size in zip(names, sizes):
        parts.append((name, slice(start, start + size)))
        start += size
    return parts


def linear_layers(kind: str, hidden: int, mlp_hidden: int) -> Dict[str, Parts]:
    """ComfyUI layer (relative to its block) -> the diffusers layers its output rows went to."""
    if kind == "double":
        layers = {"img_mod.lin": [("norm1.linear", None)], "txt_mod.lin": [("norm1_context.linear", None)],
                  "img_attn.qkv": _split([f"attn.to_{x}" for x in "qkv"], [hidden] * 3),
                  "txt_attn.qkv": _split([f"attn.add_{x}_proj" for x in "qkv"], [hidden] * 3),
                  "img_attn.proj": [("attn.to_out.0", None)], "txt_attn.proj": [("attn.to_add_out", None)]}
        for stream, ff in (("img", "ff"), ("txt", "ff_context")):
            layers[f"{stream}_mlp.0"] = [(f"{ff}.net.0.proj", None)]
            layers[f"{stream}_mlp.2"] = [(f"{ff}.net.2", None)]
        return layers
    if kind == "single":
        return {"modulation.lin": [("norm.linear", None)],
                "linear1": _split([f"attn.to_{x}" for x in "qkv"] + ["proj_mlp"], [hidden] * 3 + [mlp_hidden]),
                "linear2": [("proj_out", None)]}
    raise ValueError(f"Flux block kind {kind!r}: accepted double, single")


NORMS = {"double": {"img_attn.norm.query_norm": "attn.norm_q", "img_attn.norm.key_norm": "attn.norm_k",
                    "txt_attn.norm.query_norm": "attn.norm_added_q", "txt_attn.norm.key_norm": "attn.norm_added_k"},
         "single": {"norm.query_norm": "attn.norm_q", "norm.key_norm": "attn.norm_k"}}


def mlp_hidden(block) -> int:
    """Width of a diffusers Flux block's MLP projection, which single blocks split out of ComfyUI's linear1 (0: none)."""
    return getattr(getattr(block, "proj_mlp", None), "out_features", 0)


def convert_block(source: Dict[str, torch.Tensor], kind: str, hidden: int, mlp_hidden: int) -> Dict[str, torch.Tensor]:
    """A ComfyUI Flux block's tensors (names relative to the block) under diffusers' names; a KeyError names
    the first tensor missing."""
    out = {}
    for comfy, parts in linear_layers(kind, hidden, mlp_hidden).items():
        for suffix in ("weight", "bias"):
            tensor = source[f"{comfy}.{suffix}"]
            for name, rows in parts:
                out[f"{name}.{suffix}"] = tensor if rows is None else tensor[rows].clone()
    for comfy, name in NORMS[kind].items():
        out[f"{name}.weight"] = source[f"{comfy}.weight"]
    return out

