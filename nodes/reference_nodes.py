"""Demo nodes for the project's reference model (a small Flux-architecture DiT
trained on drawn shapes), so it runs in a normal ComfyUI graph: load it,
condition it on a class, sample with any KSampler, decode to an image."""
from functools import lru_cache

import torch
from comfy_api.v0_0_2 import io

from ..reference import codec
from ..reference.model import ANY, MODEL_FILE, conditioning, label_indices
from ..reference.shapes import ATTRIBUTES, IMAGE_SIZE

CATEGORY = "sampling/token_cache/demo"


@lru_cache(maxsize=1)
def _load_reference_model():
    import comfy.sd
    return comfy.sd.load_diffusion_model(str(MODEL_FILE))


class ShapesModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TokenCacheShapesModel",
            display_name="Shapes Reference Model",
            category=CATEGORY,
            description="The pack's own small Flux-architecture DiT, trained on procedurally drawn shapes; "
                        "loaded through ComfyUI's own model detection. For trying and measuring token caching.",
            inputs=[],
            outputs=[io.Model.Output(tooltip="The reference diffusion model (Flux architecture).")],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(_load_reference_model().clone())


class ShapesConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        def attribute(name):
            return io.Combo.Input(name, options=list(ATTRIBUTES[name]) + [ANY], default=ATTRIBUTES[name][0],
                                  tooltip=f"The {name} to draw ('{ANY}' leaves it to the model).")
        return io.Schema(
            node_id="TokenCacheShapesConditioning",
            display_name="Shapes Reference Conditioning",
            category=CATEGORY,
            description="Class labels -> the reference model's text-like conditioning (its learned label embedding).",
            inputs=[attribute("shape"), attribute("colour"), attribute("position")],
            outputs=[io.Conditioning.Output("positive", tooltip="Conditioning for the chosen class."),
                     io.Conditioning.Output("negative", tooltip="Unconditional conditioning, for CFG.")],
        )

    @classmethod
    def execute(cls, shape, colour, position) -> io.NodeOutput:
        positive, negative = conditioning(label_indices(shape, colour, position))
        return io.NodeOutput(positive, negative)


class ShapesEmptyLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TokenCacheShapesEmptyLatent",
            display_name="Shapes Reference Empty Latent",
            category=CATEGORY,
            description=f"An empty latent for {IMAGE_SIZE}x{IMAGE_SIZE} images of the reference model "
                        f"({codec.LATENT_CHANNELS} channels, pixels folded 2x2).",
            inputs=[io.Int.Input("batch_size", default=1, min=1, max=256, tooltip="Images per batch.")],
            outputs=[io.Latent.Output(tooltip="Zeros, ready for a KSampler.")],
        )

    @classmethod
    def execute(cls, batch_size) -> io.NodeOutput:
        side = IMAGE_SIZE // codec.DOWNSCALE
        return io.NodeOutput({"samples": torch.zeros(batch_size, codec.LATENT_CHANNELS, side, side)})


class ShapesDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TokenCacheShapesDecode",
            display_name="Shapes Reference Decode",
            category=CATEGORY,
            description="The reference model's latent -> image: the exact inverse of its pixel fold (no VAE).",
            inputs=[io.Latent.Input("samples", tooltip="A latent from the reference model.")],
            outputs=[io.Image.Output(tooltip="RGB image.")],
        )

    @classmethod
    def execute(cls, samples) -> io.NodeOutput:
        latent = samples["samples"]
        if latent.ndim != 4 or latent.shape[1] != codec.LATENT_CHANNELS:
            raise ValueError(f"Shapes Reference Decode takes the reference model's latents "
                             f"[batch, {codec.LATENT_CHANNELS}, h, w]; got shape {tuple(latent.shape)}")
        return io.NodeOutput(codec.decode(latent.float()).movedim(1, -1).cpu())


DEMO_NODES = [ShapesModelLoader, ShapesConditioning, ShapesEmptyLatent, ShapesDecode]
