"""Wan 2.1 / 2.2 (text- and image-to-video, the 5B TI2V): WanAttentionBlock
calls self_attn, cross_attn and ffn as submodules. Per-token timesteps (2.2
TI2V's first frame) are applied by the block itself, so nothing falls back."""
from .modulewise import REUSE, SUBSET, BlockGroup, CachedModule, ModulewiseAdapter, block_input

# keys and values of the text (and, for i2v, the CLIP image) context, not of the video tokens
_CONTEXT_LINEARS = ("k", "v", "k_img", "v_img")


def adapter(diffusion_model, family):
    return ModulewiseAdapter(diffusion_model, family, [BlockGroup("blocks", (
        CachedModule("self_attn", REUSE),
        CachedModule("cross_attn", SUBSET, context_linears=_CONTEXT_LINEARS),
        CachedModule("ffn", SUBSET),
    ), block_input)], output_layer="head")
