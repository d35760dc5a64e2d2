"""dit-token-cache: token-wise feature caching (DuCa, ToCa, TokenCache) for
diffusion transformers in ComfyUI, and the same caches for diffusers
(dit_token_cache.diffusers). Importing the package imports neither."""
import os

# dit_token_cache.diffusers lives in integrations/diffusers: a top-level folder named
# diffusers would shadow the real diffusers for anything run from the repository root
__path__.append(os.path.join(os.path.dirname(__file__), "integrations"))


async def comfy_entrypoint():
    """ComfyUI's entry point for the pack's nodes (ComfyUI is imported from here on)."""
    from .nodes.extension import TokenCacheExtension
    return TokenCacheExtension()
