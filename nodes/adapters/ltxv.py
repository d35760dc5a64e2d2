"""LTX-Video 0.9.x (LTXVModel): each BasicTransformerBlock calls its
self-attention (attn1), its cross-attention to the text (attn2, also when the
optional cross-attention AdaLN wraps it) and its feed-forward (ff) as
submodules, and applies modulation itself, per token included (image-to-video
keyframes).

The text attention mask reaches attn2 shaped (batch, 1, 1, text tokens): the
same for every query, so a subset of queries may use it as it is. The guide
mask of keyframe conditioning goes to attn1 only, which is reused.

LTX-2 (LTXAVModel, audio and video) is another class with other blocks and is
not covered here."""
from .modulewise import REUSE, SUBSET, BlockGroup, CachedModule, ModulewiseAdapter, block_input


def adapter(diffusion_model, family):
    return ModulewiseAdapter(diffusion_model, family, [BlockGroup("transformer_blocks", (
        CachedModule("attn1", REUSE),
        CachedModule("attn2", SUBSET),
        CachedModule("ff", SUBSET),
    ), block_input)])
