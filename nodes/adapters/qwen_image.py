"""Qwen-Image (text-to-image, Edit, Edit 2511, Layered): QwenImageTransformerBlock
calls its joint attention and its image and text MLPs as submodules. The joint
attention returns (image, text) and is reused whole; img_mlp follows the
image-token selection, txt_mlp the text-token one. Reference images of the Edit
models are image tokens, and 2511's timestep-zero modulation of them is applied
by the block itself."""
from .modulewise import REUSE, SUBSET, BlockGroup, CachedModule, ModulewiseAdapter, text_and_image


def adapter(diffusion_model, family):
    return ModulewiseAdapter(diffusion_model, family, [BlockGroup("transformer_blocks", (
        CachedModule("attn", REUSE, input_name="hidden_states", output_streams=(0, 1)),
        CachedModule("img_mlp", SUBSET),
        CachedModule("txt_mlp", SUBSET, stream=1),
    ), text_and_image, token_input=(0, "hidden_states"), token_output=1)],  # called by keyword, reads back (text, image)
        # norm_out (modulated by the timestep) then proj_out: refinement is trained on norm_out's output
        output_layer="norm_out")
