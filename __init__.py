"""dit-token-cache: token-wise feature caching (DuCa, ToCa, TokenCache) for
diffusion transformers in ComfyUI."""
from comfy_api.v0_0_2 import ComfyExtension

from .nodes.duca_node import DuCaCacheNode
from .nodes.reference_nodes import DEMO_NODES
from .nodes.tokencache_nodes import TOKENCACHE_NODES


class TokenCacheExtension(ComfyExtension):
    async def get_node_list(self):
        return [DuCaCacheNode, *TOKENCACHE_NODES, *DEMO_NODES]


async def comfy_entrypoint() -> TokenCacheExtension:
    return TokenCacheExtension()
