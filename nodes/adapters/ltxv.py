"""LTX-Video 0.9.x (LTXVModel): each BasicTransformerBlock calls its
self-attention (attn1), its cross-attention to the text (attn2, also when the
optional cross-attention AdaLN wraps it) and its feed-forward (ff) as
submodules, and applies modulation itself, per token included (image-to-video
keyframes).

The text attention mask reaches attn2 shaped (batch, 1, 1, text tokens): the
same for every query, so a subset of queries may use it as it is. The guide
mask of keyframe conditioning goes to attn1 only, which is reused.

Its blocks add to their input in place after normalising it, so autograd
cannot go through them: TokenCache predictors for it are trained with the
mlp_mixer architecture, the first_order objective and no LoRA.

LTX-2 (LTXAVModel, audio and video) is another class with other blocks and is
not covered here."""
from .modulewise import REUSE, SUBSET, BlockGroup, CachedModule, ModulewiseAdapter, block_input


def adapter(diffusion_model, family):
    return ModulewiseAdapter(diffusion_model, family, [BlockGroup("transformer_blocks", (
        CachedModule("attn1", REUSE),
        CachedModule("attn2", SUBSET),
        CachedModule("ff", SUBSET),
    ), block_input)], output_layer="norm_out",   # norm_out, scale/shift, proj_out: trained on norm_out's output
        autograd_through_blocks=False,   # `x += ...` after rms_norm(x) saved x: no backward through a block
        patch=diffusion_model.patchifier.patch_size)
