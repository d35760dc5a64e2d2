"""Which diffusion transformers the pack can cache, and the adapter for each."""
import importlib

from .adapters import hidream, ltxv, lumina, pixart, qwen_image, sd3, wan
from .adapters.flux import FluxFamilyAdapter

# (family name users know, ComfyUI module, class name, adapter factory(diffusion_model, family))
FAMILIES = (
    ("Flux (Flux.1 dev/schnell, Flux 2, Kontext)", "comfy.ldm.flux.model", "Flux", FluxFamilyAdapter),
    ("Chroma", "comfy.ldm.chroma.model", "Chroma", FluxFamilyAdapter),
    ("HunyuanVideo", "comfy.ldm.hunyuan_video.model", "HunyuanVideo", FluxFamilyAdapter),
    ("Wan (2.1, 2.2)", "comfy.ldm.wan.model", "WanModel", wan.adapter),
    ("Qwen-Image (text-to-image, Edit, Layered)", "comfy.ldm.qwen_image.model", "QwenImageTransformer2DModel", qwen_image.adapter),
    ("Lumina 2 (Lumina Image 2.0, Z-Image, Neta Lumina, NewBie)", "comfy.ldm.lumina.model", "NextDiT", lumina.adapter),
    ("HiDream (I1, E1)", "comfy.ldm.hidream.model", "HiDreamImageTransformer2DModel", hidream.adapter),
    ("PixArt (alpha, Sigma)", "comfy.ldm.pixart.pixartms", "PixArtMS", pixart.adapter),
    ("LTX-Video (0.9.x)", "comfy.ldm.lightricks.model", "LTXVModel", ltxv.adapter),
    ("SD3 / SD3.5", "comfy.ldm.modules.diffusionmodules.mmdit", "OpenAISignatureMMDITWrapper", sd3.adapter),
)


def supported_families() -> str:
    return ", ".join(name for name, *_ in FAMILIES)


def adapter_for(model_patcher):
    """The family adapter for a ComfyUI MODEL, or a ValueError naming the model
    and the supported families."""
    base_model = getattr(model_patcher, "model", None)
    diffusion_model = getattr(base_model, "diffusion_model", None)
    if diffusion_model is None:
        raise ValueError(f"Token caching needs a diffusion model; got {type(base_model).__name__}. "
                         f"Supported families: {supported_families()}.")
    for name, module_name, class_name, adapter_class in FAMILIES:
        # exact class: subclasses (Chroma Radiance, ControlNet-Flux) run other forwards
        if type(diffusion_model) is getattr(importlib.import_module(module_name), class_name):
            return adapter_class(diffusion_model, name.split(" (")[0])
    raise ValueError(
        f"Token caching does not support this model yet: {type(base_model).__name__} "
        f"({type(diffusion_model).__module__}.{type(diffusion_model).__name__}). "
        f"Supported families: {supported_families()}.")


def tokencache_adapter_for(model_patcher):
    """adapter_for, for a model TokenCache can drive; otherwise a ValueError that
    points to DuCa."""
    adapter = adapter_for(model_patcher)
    if not adapter.tokencache:
        raise ValueError(f"TokenCache supports the Flux family (Flux, Chroma, HunyuanVideo) so far, not "
                         f"{adapter.family}; use DuCa Cache for {adapter.family} models")
    return adapter
