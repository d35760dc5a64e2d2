"""Per-cond cache of block features.

A batch from the sampler holds one chunk of rows per cond uuid (cond, uncond,
...), and ComfyUI batches conds together or runs them one at a time depending
on free memory. Entries are therefore stored per uuid and reassembled for
whatever uuids a call carries, so both ways see the same state.
"""
from typing import Hashable, Optional, Sequence

import torch


class CacheStore:
    def __init__(self, device: Optional[torch.device] = None):
        self.device = device          # None: keep each entry where it was computed
        self._entries: dict = {}      # uuid -> {key: tensor}
        self.nbytes = 0
        self.peak_bytes = 0

    def _chunks(self, uuids: Sequence[Hashable], tensor: torch.Tensor):
        if tensor.shape[0] % len(uuids):
            raise ValueError(f"batch of {tensor.shape[0]} rows does not split into {len(uuids)} conds")
        return zip(uuids, tensor.chunk(len(uuids), dim=0))

    def put(self, uuids: Sequence[Hashable], key: Hashable, tensor: torch.Tensor) -> None:
        """Store a copy (ComfyUI's blocks update their inputs in place)."""
        target = self.device if self.device is not None else tensor.device
        for uuid, chunk in self._chunks(uuids, tensor):
            entries = self._entries.setdefault(uuid, {})
            if key in entries:
                self.nbytes -= _size(entries[key])
            entries[key] = chunk.to(target, copy=True)
            self.nbytes += _size(entries[key])
        self.peak_bytes = max(self.peak_bytes, self.nbytes)

    def has(self, uuids: Sequence[Hashable], key: Hashable) -> bool:
        return all(key in self._entries.get(uuid, {}) for uuid in uuids)

    def shape(self, uuid: Hashable, key: Hashable) -> torch.Size:
        return self._entries[uuid][key].shape

    def get(self, uuids: Sequence[Hashable], key: Hashable, device: torch.device) -> torch.Tensor:
        chunks = [self._entries[uuid][key] for uuid in uuids]
        joined = chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=0)
        return joined.to(device, non_blocking=True)

    def scatter(self, uuids: Sequence[Hashable], key: Hashable, index: torch.Tensor, values: torch.Tensor, dim: int = 1) -> None:
        """Write freshly computed rows `values` at token positions `index`."""
        for uuid, chunk in self._chunks(uuids, values):
            stored = self._entries[uuid][key]
            stored.index_copy_(dim, index.to(stored.device), chunk.to(stored.device, stored.dtype))

    def increment(self, uuids: Sequence[Hashable], key: Hashable) -> None:
        """Add 1 in place (staleness counters on a step that computed nothing)."""
        for uuid in uuids:
            self._entries[uuid][key] += 1

    def uuids(self):
        return list(self._entries)

    def clear(self) -> None:
        self._entries = {}
        self.nbytes = 0


def _size(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
