"""HiDream-I1 (full, dev, fast) and E1: each HiDreamImageBlock wraps a double- or
single-stream block whose attention (attn1) and feed-forwards are submodules.
The image feed-forward ff_i is a mixture of experts with per-token routing, so
it runs on a token subset like any MLP; ff_t is the text stream's feed-forward.
Double-stream attention returns (image, text) and is reused whole."""
from . import cond_tensor, cross_attn_tokens
from .modulewise import REUSE, SUBSET, BlockGroup, CachedModule, ModulewiseAdapter


def _input(args, kwargs, position, name):
    return args[position] if len(args) > position else kwargs[name]


def _skipped_double_block(args, kwargs):
    # the model keeps the first text tokens of what comes back and replaces the rest
    return _input(args, kwargs, 0, "image_tokens"), _input(args, kwargs, 2, "text_tokens")


def _skipped_single_block(args, kwargs):
    # the model cuts the Llama tokens appended for this block off what comes back
    return _input(args, kwargs, 0, "image_tokens")


def _text_tokens(model_conds):
    # the blocks see the T5 tokens and the Llama tokens twice: those of the last layer, then of the block's own layer
    llama = cond_tensor(model_conds, "encoder_hidden_states_llama3")
    return cross_attn_tokens(model_conds) + (2 * llama.shape[2] if llama is not None else 0)


def adapter(diffusion_model, family):
    return ModulewiseAdapter(diffusion_model, family, [
        BlockGroup("double_stream_blocks", (
            CachedModule("block.attn1", REUSE, output_streams=(0, 1)),
            CachedModule("block.ff_i", SUBSET),
            CachedModule("block.ff_t", SUBSET, stream=1),
        ), _skipped_double_block, token_input=(0, "image_tokens"), token_output=0),
        BlockGroup("single_stream_blocks", (
            CachedModule("block.attn1", REUSE),
            CachedModule("block.ff_i", SUBSET),
        ), _skipped_single_block, token_input=(0, "image_tokens"), text_in_tokens=True),
    ], output_layer="final_layer", text_tokens=_text_tokens)
