"""The Flux family's blocks (comfy.ldm.flux.layers DoubleStreamBlock and
SingleStreamBlock, run by Flux.1 dev/schnell, Flux 2, Chroma and
HunyuanVideo) rebuilt from their own submodules: modulation, norms, qkv,
proj, mlp, linear1/2 and ComfyUI's own attention function, so quantised ops,
LoRA weight patches and attention overrides keep applying. Out of place (so
they can be trained and their branches kept) and bit-identical to the
blocks' own forwards. Modulation that ComfyUI applies per token range
(Kontext reference images at timestep zero, HunyuanVideo i2v) is gathered per
token, so token subsets work the same way.
"""
from dataclasses import dataclass

import torch

from comfy.ldm.flux.layers import ModulationOut, apply_mod
from comfy.ldm.flux.math import attention


def linear_params(module) -> int:
    return sum(p.numel() for name, p in module.named_parameters() if name.endswith("weight") and p.ndim == 2)


def double_mods(block, vec):
    if block.modulation:
        img_mod1, img_mod2 = block.img_mod(vec)
        txt_mod1, txt_mod2 = block.txt_mod(vec)
        return img_mod1, img_mod2, txt_mod1, txt_mod2
    (img_mod1, img_mod2), (txt_mod1, txt_mod2) = vec
    return img_mod1, img_mod2, txt_mod1, txt_mod2


def single_mod(block, vec):
    return block.modulation(vec)[0] if block.modulation else vec


def per_token(mods) -> bool:
    """Modulation with several rows (Kontext timestep-zero references: current t
    and t = 0; HunyuanVideo i2v: guiding frame and the rest) applies per token
    range, through ComfyUI's modulation_dims."""
    return any(m.shift.ndim == 3 and m.shift.shape[1] != 1 for m in mods)


@dataclass(frozen=True)
class TokenModulation:
    """Modulation as ComfyUI applies it with modulation_dims: `mod` holds one
    (shift, scale, gate) row per modulation vector ([B, rows, D]), `rows` the
    row of each token. Rows are gathered where applied, so every token subset
    gets its own."""
    mod: ModulationOut
    rows: torch.Tensor

    def take(self, index):
        return TokenModulation(self.mod, self.rows[index])


def token_rows(dims, tokens, device):
    """The modulation row of each token from modulation_dims [(start, end, row)];
    None unless every token lies in exactly one range (apply_mod leaves the
    others unmodulated)."""
    rows = torch.zeros(tokens, dtype=torch.long)
    hits = torch.zeros(tokens, dtype=torch.long)
    for start, end, row in dims:
        rows[start:end] = row
        hits[start:end] += 1
    return rows.to(device) if bool((hits == 1).all()) else None


def token_mods(args, dims_key, mods, x):
    """`mods` as ComfyUI applies them to the tokens of `x`: as they are without
    modulation_dims, as TokenModulation with them; None where modulation has
    several rows and no known token layout. HunyuanVideo passes the dims in the
    block's args. Flux keeps them out of the block-replace args, so they are
    rebuilt as forward_orig builds them from timestep_zero_index: the
    reference-image tokens, last in the sequence, take row 1 (t = 0), the
    others row 0."""
    tokens = x.shape[1]
    dims = args.get(dims_key)
    if dims is None and per_token(mods):
        references = sum((args.get("transformer_options") or {}).get("reference_image_num_tokens", ()))
        if not 0 < references < tokens:
            return None
        dims = [(0, tokens - references, 0), (tokens - references, tokens, 1)]
    if dims is None:
        return mods
    rows = token_rows(dims, tokens, x.device)
    return None if rows is None else [TokenModulation(m, rows) for m in mods]


def double_token_mods(block, args):
    img_mod1, img_mod2, txt_mod1, txt_mod2 = double_mods(block, args["vec"])
    img_mods = token_mods(args, "modulation_dims_img", [img_mod1, img_mod2], args["img"])
    txt_mods = token_mods(args, "modulation_dims_txt", [txt_mod1, txt_mod2], args["txt"])
    return None if img_mods is None or txt_mods is None else (*img_mods, *txt_mods)


def take_tokens(mod, index):
    return mod.take(index) if isinstance(mod, TokenModulation) else mod


def modulate(x, mod):
    """x * (1 + scale) + shift as apply_mod computes it: fused for one row; per
    token as its per-range in-place ops do (multiply, then add, each result in
    x's dtype), so that the block's output stays bit-identical."""
    if isinstance(mod, TokenModulation):
        scaled = (x * (1 + mod.mod.scale[:, mod.rows])).to(x.dtype)
        return (scaled + mod.mod.shift[:, mod.rows]).to(x.dtype)
    return apply_mod(x, 1 + mod.scale, mod.shift)


def gated(out, mod):
    if isinstance(mod, TokenModulation):
        return (out * mod.mod.gate[:, mod.rows]).to(out.dtype)
    return apply_mod(out, mod.gate)


def stream_qkv(norm1, attn, mod, x, heads):
    qkv = attn.qkv(modulate(norm1(x), mod))
    # explicit head size: a token subset may be empty
    q, k, v = qkv.view(qkv.shape[0], qkv.shape[1], 3, heads, qkv.shape[-1] // (3 * heads)).permute(2, 0, 3, 1, 4)
    q, k = attn.norm(q, k, v)
    return q, k, v


def mlp_branch(x, norm2, mlp, mod2):
    return mlp(modulate(norm2(x), mod2))


def single_mlp_act(block, mlp):
    if block.yak_mlp:
        half = block.mlp_hidden_dim_first // 2
        return block.mlp_act(mlp[..., half:]) * mlp[..., :half]
    return block.mlp_act(mlp)


def block_attention(q, k, v, args):
    return attention(q, k, v, pe=args["pe"], mask=args.get("attn_mask", args.get("attention_mask")),
                     transformer_options=args.get("transformer_options") or {})


def finish_stream(x, attn_out, norm2, mlp, mod1, mod2):
    x = x + gated(attn_out, mod1)
    mlp_out = mlp_branch(x, norm2, mlp, mod2)
    return x + gated(mlp_out, mod2), mlp_out


def finite_fp16(x):
    return torch.nan_to_num(x, nan=0.0, posinf=65504, neginf=-65504) if x.dtype == torch.float16 else x


def single_finish(x, mod, output):
    return finite_fp16(x + gated(output, mod))


def double_block_forward(block, args, mods=None, on_qkv=None):
    """A DoubleStreamBlock's forward rebuilt from its own submodules, without
    in-place updates (so it can be trained and its branches kept). Returns
    (img, txt, branches): the attention-projection and MLP outputs of both
    streams before gating. Bit-identical to the block's own forward.
    on_qkv(x_joint, q, k, v) sees the joint (txt, img) input and q/k/v."""
    img, txt = args["img"], args["txt"]
    img_mod1, img_mod2, txt_mod1, txt_mod2 = mods if mods is not None else double_mods(block, args["vec"])
    txt_len = txt.shape[1]
    img_q, img_k, img_v = stream_qkv(block.img_norm1, block.img_attn, img_mod1, img, block.num_heads)
    txt_q, txt_k, txt_v = stream_qkv(block.txt_norm1, block.txt_attn, txt_mod1, txt, block.num_heads)
    q, k, v = torch.cat((txt_q, img_q), dim=2), torch.cat((txt_k, img_k), dim=2), torch.cat((txt_v, img_v), dim=2)
    if on_qkv is not None:
        on_qkv(torch.cat((txt, img), dim=1), q, k, v)
    attn = block_attention(q, k, v, args)
    del q, k, v
    branches = {"img_attn": block.img_attn.proj(attn[:, txt_len:]), "txt_attn": block.txt_attn.proj(attn[:, :txt_len])}
    img, branches["img_mlp"] = finish_stream(img, branches["img_attn"], block.img_norm2, block.img_mlp, img_mod1, img_mod2)
    txt, branches["txt_mlp"] = finish_stream(txt, branches["txt_attn"], block.txt_norm2, block.txt_mlp, txt_mod1, txt_mod2)
    return img, finite_fp16(txt), branches


def single_block_forward(block, args, mod=None, on_qkv=None):
    """A SingleStreamBlock's forward rebuilt from its own submodules, without
    in-place updates. Returns (x, attention output, linear2 output before
    gating). Bit-identical to the block's own forward."""
    x = args["img"]
    mod = mod if mod is not None else single_mod(block, args["vec"])
    qkv, mlp = torch.split(block.linear1(modulate(block.pre_norm(x), mod)),
                           [3 * block.hidden_size, block.mlp_hidden_dim_first], dim=-1)
    q, k, v = qkv.view(qkv.shape[0], qkv.shape[1], 3, block.num_heads, -1).permute(2, 0, 3, 1, 4)
    del qkv
    q, k = block.norm(q, k, v)
    if on_qkv is not None:
        on_qkv(x, q, k, v)
    attn = block_attention(q, k, v, args)
    del q, k, v
    output = block.linear2(torch.cat((attn, single_mlp_act(block, mlp)), 2))
    return single_finish(x, mod, output), attn, output
