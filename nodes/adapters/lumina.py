"""Lumina 2 and the models built on its NextDiT (Z-Image, Neta Lumina, NewBie):
each JointTransformerBlock of `layers` runs one stream of text and image tokens
through `attention` and `feed_forward` submodules. The refiner blocks before it
(text alone, image alone) are few and always computed."""
from .modulewise import REUSE, SUBSET, BlockGroup, CachedModule, ModulewiseAdapter, block_input


def _skipped_block(args, kwargs):
    # a copy: "double_block" patches (Z-Image Fun ControlNet) write into the block's
    # output in place, and the first block's input is also kept as img_input
    return block_input(args, kwargs).clone()


def adapter(diffusion_model, family):
    return ModulewiseAdapter(diffusion_model, family, [BlockGroup("layers", (
        CachedModule("attention", REUSE),
        CachedModule("feed_forward", SUBSET),
    ), _skipped_block, text_in_tokens=True)], output_layer="final_layer")
