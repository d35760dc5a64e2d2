"""TokenCache predictor support for the Flux family: one block run on a
PlanningInput (the first-block predictor's copy of the model's first block)
and, for chained training, a block run that autograd can reach through."""
import torch

from ...accel_core.tokencache import PlanningInput, call_for_autograd, map_block_args
from .flux_blocks import double_block_forward, double_token_mods, single_block_forward, single_mod, token_mods


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
