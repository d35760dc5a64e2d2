"""ComfyUI side of the pack: nodes, the patcher and per-family adapters."""
