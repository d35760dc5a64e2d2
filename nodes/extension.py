"""The pack's ComfyUI extension: its nodes."""
from comfy_api.v0_0_2 import ComfyExtension

from .duca_node import DuCaCacheNode
from .reference_nodes import DEMO_NODES
from .tokencache_nodes import TOKENCACHE_NODES


class TokenCacheExtension(ComfyExtension):
    async def get_node_list(self):
        return [DuCaCacheNode, *TOKENCACHE_NODES, *DEMO_NODES]
