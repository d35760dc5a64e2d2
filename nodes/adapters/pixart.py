"""PixArt-alpha and PixArt-Sigma (PixArtMS): each PixArtMSBlock calls its
self-attention (attn), cross-attention to the T5 text (cross_attn) and MLP as
submodules. ComfyUI has no block-replace hook for PixArt, so the object
patches of the modulewise engine are the only way in.

As in the research method, self-attention is reused at conservative steps and
cross-attention is recomputed for the selected queries (its keys and values
come from the text, so every query's output depends on that query alone)."""
from .modulewise import REUSE, SUBSET, BlockGroup, CachedModule, ModulewiseAdapter, block_input


def adapter(diffusion_model, family):
    return ModulewiseAdapter(diffusion_model, family, [BlockGroup("blocks", (
        CachedModule("attn", REUSE),
        CachedModule("cross_attn", SUBSET),
        CachedModule("mlp", SUBSET),
    ), block_input)], output_layer="final_layer")
