"""TokenCache predictor support for the Flux family: one block run on a
PlanningInput (the first-block predictor's copy of the model's first block)
and, for chained training, a block run that autograd can reach through."""
import torch

from ...accel_core.tokencache import PlanningInput, call_for_autograd, map_block_args
from .flux_blocks import (double_block_forward, double_token_mods, finite_fp16, gated, mlp_branch, modulate,
                          single_block_forward, single_finish, single_mlp_act, single_mod, token_mods)


def run_block(kind, block, args):
    """A double or single block on `args`; the joint tokens cat(txt, img) it
    outputs, or None where its modulation has no known row for every token."""
    if kind == "double":
        mods = double_token_mods(block, args)
        if mods is None:
            return None
        img, txt, _ = double_block_forward(block, args, mods)
        return torch.cat((txt, img), dim=1)
    mods = token_mods(args, "modulation_dims", [single_mod(block, args["vec"])], args["img"])
    return None if mods is None else single_block_forward(block, args, mods[0])[0]


class _BlockCall(torch.nn.Module):
    def __init__(self, kind, block):
        super().__init__()
        self.kind = kind
        self.block = block

    def forward(self, args):
        return run_block(self.kind, self.block, args)


def run_block_for_autograd(kind, block, args):
    """run_block where autograd can reach the inputs (call_for_autograd)."""
    return call_for_autograd(_BlockCall(kind, block), args)


def mixed(a, fresh, cached):
    """a * fresh + (1 - a) * cached per token (a [B, L], 1 = recomputed), in float32."""
    a = a[..., None]
    return a * fresh.float() + (1.0 - a) * cached.float()


def _p_step_stream(x, a, cached_attn, cached_mlp, norm2, mlp, mod1, mod2):
    """A double block's stream at a P-step: the cached attention output re-gated,
    the MLP recomputed to the degree a on the resulting input."""
    x = x + gated(cached_attn.to(x.dtype), mod1)
    fresh = mlp_branch(x, norm2, mlp, mod2)
    return x + gated(mixed(a, fresh, cached_mlp).to(x.dtype), mod2)


class _PStepCall(torch.nn.Module):
    """A block as TokenCache's P-step runs it, with soft scores: attention
    reused from the cache, the MLP (double: per stream; single: its half of
    linear1, through linear2 with the cached attention) recomputed to the
    degree a, the rest reused. Returns the joint tokens cat(txt, img)."""

    def __init__(self, kind, block):
        super().__init__()
        self.kind = kind
        self.block = block

    def forward(self, args, a, cached, txt_len):
        block = self.block
        if self.kind == "double":
            img_mod1, img_mod2, txt_mod1, txt_mod2 = double_token_mods(block, args)
            txt = _p_step_stream(args["txt"], a[:, :txt_len], cached["txt_attn"], cached["txt_mlp"], block.txt_norm2,
                                 block.txt_mlp, txt_mod1, txt_mod2)
            img = _p_step_stream(args["img"], a[:, txt_len:], cached["img_attn"], cached["img_mlp"], block.img_norm2,
                                 block.img_mlp, img_mod1, img_mod2)
            return torch.cat((finite_fp16(txt), img), dim=1)
        x = args["img"]
        mod = token_mods(args, "modulation_dims", [single_mod(block, args["vec"])], x)[0]
        mlp = torch.split(block.linear1(modulate(block.pre_norm(x), mod)),
                          [3 * block.hidden_size, block.mlp_hidden_dim_first], dim=-1)[1]
        fresh = block.linear2(torch.cat((cached["attn"].to(x.dtype), single_mlp_act(block, mlp)), 2))
        return single_finish(x, mod, mixed(a, fresh, cached["out"]).to(x.dtype))


def run_p_step_for_autograd(kind, block, args, a, cached, txt_len):
    return call_for_autograd(_PStepCall(kind, block), args, a, cached, txt_len)


def recorded_block(kind, block, args):
    """(output dict, branches) of a block run as a full step runs it: what a
    later P-step reuses (attention and MLP outputs before gating)."""
    if kind == "double":
        mods = double_token_mods(block, args)
        if mods is None:
            return None, None
        img, txt, branches = double_block_forward(block, args, mods)
        return {"img": img, "txt": txt}, branches
    mods = token_mods(args, "modulation_dims", [single_mod(block, args["vec"])], args["img"])
    if mods is None:
        return None, None
    x, attn, output = single_block_forward(block, args, mods[0])
    return {"img": x}, {"attn": attn, "out": output}


class FirstBlockRunner:
    """How FirstBlockPredictor runs its copy of the model's first block: on the
    first block's own inputs, cast to the copy's dtype."""

    def __init__(self, kind: str, block_flops):
        self.kind = kind
        self.block_flops = block_flops   # tokens -> one row's work, as the adapter counts its first block

    def __call__(self, block, inputs: PlanningInput):
        dtype = next(block.parameters()).dtype
        args = map_block_args(inputs.block_args, lambda t: t.to(dtype) if t.is_floating_point() else t)
        return run_block(self.kind, block, args)

    def flops(self, block, tokens: int) -> float:
        return self.block_flops(tokens)
