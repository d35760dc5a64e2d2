"""SD3 and SD3.5 (MMDiT, OpenAISignatureMMDITWrapper): each JointBlock has an
image half (x_block) and a text half (context_block), DismantledBlocks whose
joint attention is not a submodule call: the block's block_mixing() runs each
half's pre_attention (modulation, qkv), a functional attention over the
concatenated tokens, then each half's post_attention (attn.proj, gated
residual, MLP).

Full steps run the block as it is. The engine caches the attention's projected
output through attn.proj (a REUSE module; SD3.5 Medium's image-only second
attention through attn2.proj) and the MLPs (SUBSET modules: stream 0 image,
stream 1 text). A conservative step runs no attention: each half's own
post_attention gets the modulation of this step, attn.proj returns its cache
and the MLP runs on the selected tokens. The last block's text half is
pre-only (no proj, no MLP, no text output)."""
import dataclasses
import functools

from ...accel_core.run import BlockMode
from .modulewise import REUSE, SUBSET, BlockGroup, CachedModule, ModulewiseAdapter


def _cached_modules(block):
    # attn.proj caches the attention branch, so the branch's qkv counts as its work too
    modules = [CachedModule("x_block.attn.proj", REUSE, work_of="x_block.attn")]
    if block.x_block.x_block_self_attn:
        modules.append(CachedModule("x_block.attn2.proj", REUSE, work_of="x_block.attn2"))
    modules.append(CachedModule("x_block.mlp", SUBSET))
    if not block.context_block.pre_only:
        modules += [CachedModule("context_block.attn.proj", REUSE, stream=1, work_of="context_block.attn"),
                    CachedModule("context_block.mlp", SUBSET, stream=1)]
    return tuple(modules)


def _skipped_block(args, kwargs):
    context, x = args[:2]
    return context, x


def _conservative_half(half, x, c):
    """One DismantledBlock through its own post_attention with no attention computed.

    pre_attention's modulation depends on c alone, so it runs on one token (one
    token's qkv); attn.proj and attn2.proj are REUSE modules that return their
    cached output whatever they are given, so x stands in for the attention."""
    if half.x_block_self_attn:
        *_, intermediates = half.pre_attention_x(x[:, :1], c)
        return half.post_attention_x(x, x, x, *intermediates[1:])
    _, intermediates = half.pre_attention(x[:, :1], c)
    return half.post_attention(x, x, *intermediates[1:])


def conservative_joint_block(block, context, x, c):
    """(context, x) of a JointBlock at a conservative step, as block_mixing returns them."""
    if block.context_block.pre_only:
        context = None
    else:
        context = _conservative_half(block.context_block, context, c)
    return context, _conservative_half(block.x_block, x, c)


class SD3Adapter(ModulewiseAdapter):
    def __init__(self, diffusion_model, family):
        super().__init__(diffusion_model, family, [BlockGroup("joint_blocks", (), _skipped_block, token_input=(1, "x"),
                                                              token_output=1)], output_layer="final_layer")
        # the cached modules differ between blocks: the last text half is pre-only, and
        # SD3.5 Medium has its second attention in some blocks only
        self.blocks = [(path, block, dataclasses.replace(group, modules=_cached_modules(block)))
                       for path, block, group in self.blocks]

    def install(self, model_patcher, hooks):
        # under the engine's block patch, which calls it at full and conservative steps
        for block_id, (path, block, group) in enumerate(self.blocks):
            forward = model_patcher.get_model_object(f"{path}.forward")
            model_patcher.add_object_patch(f"{path}.forward", functools.partial(
                self._joint_block, hooks.current_run, block_id, block, group, forward))
        super().install(model_patcher, hooks)

    def _joint_block(self, current_run, block_id, block, group, forward, context, x, c, **kwargs):
        run = current_run()
        if (run is None or run.plan is None or self.call is None or self.call.mode is not BlockMode.SUBSET
                or not self._attention_cached(run, block_id, group, context, x)):
            return forward(context, x, c=c, **kwargs)
        return conservative_joint_block(block, context, x, c)

    def _attention_cached(self, run, block_id, group, context, x) -> bool:
        """Whether every attention output of the block is cached for these token counts;
        otherwise the block runs as it is (and the engine says why once)."""
        return all(self._cached(run, block_id, spec, spec.path + "#", (x if spec.stream == 0 else context).shape[1])
                   for spec in group.modules if spec.role == REUSE)


def adapter(diffusion_model, family):
    return SD3Adapter(diffusion_model, family)
