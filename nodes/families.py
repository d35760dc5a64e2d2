"""Which diffusion transformers the pack can cache, and the adapter for each."""
import importlib
from dataclasses import dataclass
from typing import Callable

from .adapters import hidream, ltxv, lumina, pixart, qwen_image, sd3, wan
from .adapters.flux import FluxFamilyAdapter


@dataclass(frozen=True)
class Family:
    key: str           # stable, written into predictor files: never derived from the label
    label: str         # the name users know, with the models it covers
    module: str        # ComfyUI module of the diffusion model class
    class_name: str
    adapter: Callable  # (diffusion_model, family name) -> Adapter

    @property
    def name(self) -> str:
        return self.label.split(" (")[0]


FAMILIES = (
    Family("flux", "Flux (Flux.1 dev/schnell, Flux 2, Kontext)", "comfy.ldm.flux.model", "Flux", FluxFamilyAdapter),
    Family("chroma", "Chroma", "comfy.ldm.chroma.model", "Chroma", FluxFamilyAdapter),
    Family("hunyuan_video", "HunyuanVideo", "comfy.ldm.hunyuan_video.model", "HunyuanVideo", FluxFamilyAdapter),
    Family("wan", "Wan (2.1, 2.2)", "comfy.ldm.wan.model", "WanModel", wan.adapter),
    Family("qwen_image", "Qwen-Image (text-to-image, Edit, Layered)", "comfy.ldm.qwen_image.model",
           "QwenImageTransformer2DModel", qwen_image.adapter),
    Family("lumina2", "Lumina 2 (Lumina Image 2.0, Z-Image, Neta Lumina, NewBie)", "comfy.ldm.lumina.model", "NextDiT",
           lumina.adapter),
    Family("hidream", "HiDream (I1, E1)", "comfy.ldm.hidream.model", "HiDreamImageTransformer2DModel", hidream.adapter),
    Family("pixart", "PixArt (alpha, Sigma)", "comfy.ldm.pixart.pixartms", "PixArtMS", pixart.adapter),
    Family("ltxv", "LTX-Video (0.9.x)", "comfy.ldm.lightricks.model", "LTXVModel", ltxv.adapter),
    Family("sd3", "SD3 / SD3.5", "comfy.ldm.modules.diffusionmodules.mmdit", "OpenAISignatureMMDITWrapper", sd3.adapter),
)


def supported_families() -> str:
    return ", ".join(family.label for family in FAMILIES)


def adapter_for(model_patcher):
    """The family adapter for a ComfyUI MODEL, or a ValueError naming the model
    and the supported families."""
    base_model = getattr(model_patcher, "model", None)
    diffusion_model = getattr(base_model, "diffusion_model", None)
    if diffusion_model is None:
        raise ValueError(f"Token caching needs a diffusion model; got {type(base_model).__name__}. "
                         f"Supported families: {supported_families()}.")
    for family in FAMILIES:
        # exact class: subclasses (Chroma Radiance, ControlNet-Flux) run other forwards
        if type(diffusion_model) is getattr(importlib.import_module(family.module), family.class_name):
            adapter = family.adapter(diffusion_model, family.name)
            adapter.family_key = family.key
            return adapter
    raise ValueError(
        f"Token caching does not support this model yet: {type(base_model).__name__} "
        f"({type(diffusion_model).__module__}.{type(diffusion_model).__name__}). "
        f"Supported families: {supported_families()}.")

