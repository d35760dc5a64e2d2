"""One adapter per model family: how to run that family's blocks on a token
subset. The run (accel_core.run.CacheRun) decides what each step computes;
an adapter computes what it is told, through the family's own submodules."""
import copy
import math
from typing import Optional, Protocol, Sequence

import torch

from ...accel_core.memory import CacheLayout

# TokenCache's planning space where text and image tokens are planned together (the Flux family in both
# hosts): a predictor file trained in one host drives the other
JOINT_TOKEN_LAYOUT = "cat(txt, img): the tokens entering the first double-stream block"


class Adapter(Protocol):
    """What a family adapter provides (FluxFamilyAdapter, ModulewiseAdapter):
    DuCa needs install(); TokenCache, its predictor training and its LoRA
    refinement need the rest. TokenCache plans in one token space per family
    (token_layout): block_args is a block call as the adapter represents it."""
    family: str                  # the name users know, for messages
    family_key: str              # stable key (nodes/families.py), written into predictor files
    selectors: Sequence[str]     # token selectors it can score
    token_layout: str            # TokenCache's planning space, written into predictor files
    hidden: int                  # width of the tokens in that space
    block_count: int
    output_layer: str            # module after the blocks that the LoRA refinement is trained through
    first_block_kind: str        # what a first-block predictor copies, checked when its file is loaded
    autograd_through_blocks: bool  # whether training can backpropagate through the blocks (chained, first_block, LoRA)

    def cache_layout(self, latent_shape: Sequence[int], text_tokens: int, dtype_bytes: int) -> CacheLayout:
        """What one cond's cache holds at this latent size and text length
        (accel_core.memory), for the memory ComfyUI keeps free before a run."""

    def text_tokens(self, model_conds: dict) -> int:
        """Text tokens the blocks see for a cond, from its model inputs (ComfyUI's extra_conds output)."""

    def install(self, model_patcher, hooks) -> None:
        """Patch the cloned ModelPatcher so its blocks hand their work to the run
        under way (hooks: nodes.patcher.PatchHooks); at the first block, call
        run.plan_tokens with the planning space's tokens."""

    def predictor_block(self, for_training: bool = True) -> torch.nn.Module:
        """A float32 CPU copy of the first block, for a first-block predictor."""

    def predictor_parts(self):
        """(a copy of the first block, its runner, its kind) for a first-block predictor."""

    def block_layout(self) -> dict:
        """Blocks per kind, for the predictor file."""

    def block_paths(self) -> list:
        """(path in the diffusion model, block) per block, in the run's numbering."""

    def wrap_block(self, model_patcher, block_id: int, wrapper) -> None:
        """wrapper(call, block_args) -> output around a block of the clone."""

    def copy_tokens(self, block_id: int, block_args, copy=torch.Tensor.clone) -> dict:
        """block_args with the token inputs copied by `copy` (blocks may update them in place)."""

    def tokens_in(self, block_id: int, block_args, count: Optional[int] = None) -> torch.Tensor:
        """The planning-space tokens of a block's input (the first `count`)."""

    def tokens_out(self, block_id: int, output, count: Optional[int] = None) -> torch.Tensor:
        """The same tokens of its output."""

    def rest_of_inputs(self, block_id: int, block_args, count: Optional[int]) -> dict:
        """Its inputs besides those tokens, for block_contribution."""

    def text_length(self, block_args) -> int:
        """Text tokens at the start of the planning space."""

    def output_tokens(self, x: torch.Tensor, count: int) -> torch.Tensor:
        """The `count` tokens of the last block's output that the output layer reads."""

    def block_contribution(self, block_id: int, x: torch.Tensor, block_args, txt_len: int,
                           dtype: torch.dtype) -> torch.Tensor:
        """f_l(x) = block(x) - x through the model's own block, for chained training."""


def latent_tokens(latent_shape: Sequence[int], patch) -> int:
    """Tokens of one latent [batch, channels, (frames,) height, width] cut into
    patches: `patch` per dimension, or an int for height and width only; the
    models pad a partial patch."""
    dims = list(latent_shape[2:])
    if isinstance(patch, int):
        patch = (1,) * (len(dims) - 2) + (patch, patch)
    patch = tuple(patch)[-len(dims):]
    return math.prod(math.ceil(d / p) for d, p in zip(dims, patch))


def cond_tensor(model_conds: dict, name: str) -> Optional[torch.Tensor]:
    """A tensor of a cond's model inputs (ComfyUI's extra_conds output)."""
    cond = model_conds.get(name)
    return getattr(cond, "cond", None)


def cross_attn_tokens(model_conds: dict) -> int:
    """Text tokens of a cond: its cross-attention context as the model gets it (0 without one)."""
    context = cond_tensor(model_conds, "c_crossattn")
    return context.shape[1] if context is not None and context.ndim >= 3 else 0


def plain_float_copy(block: torch.nn.Module, for_training: bool = True) -> torch.nn.Module:
    """A trainable float32 copy of a block on the CPU, as plain torch modules:
    ComfyUI's weight casting and patch hooks off, and no object patches
    applied to the model it came from. Training starts from its weights, so
    they must be plain floats then; a predictor file overwrites them."""
    odd = sorted({str(p.dtype) for p in block.parameters()
                  if p.dtype not in (torch.float32, torch.float16, torch.bfloat16)})
    if odd and for_training:
        raise ValueError(f"the first-block predictor copies the model's first block, whose weights are "
                         f"{', '.join(odd)}; load the model in fp16, bf16 or fp32, or use architecture mlp_mixer")
    copied = copy.deepcopy(block).to(device="cpu", dtype=torch.float32)
    for module in copied.modules():
        module.__dict__.pop("forward", None)   # an object patch carried over by the copy
        if hasattr(module, "comfy_cast_weights"):
            module.comfy_cast_weights = False
            module.weight_function, module.bias_function = [], []
    return copied.requires_grad_(True)
