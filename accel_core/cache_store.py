"""Per-cond cache of block features.

A batch from the sampler holds one chunk of rows per cond uuid (cond, uncond,
...), and ComfyUI batches conds together or runs them one at a time depending
on free memory. Entries are therefore stored per uuid and reassembled for
whatever uuids a call carries, so both ways see the same state.

Two kinds of entry: plain tensors (staleness counters, selector features),
kept where they were computed, and features, block outputs kept with their
history so they can be estimated at a later time (forecast.FeatureHistory),
at the cache's precision and on its device.

Keys are (block id, name); the store counts bytes per block so that a run
with a memory budget can drop the blocks that do not fit.
"""
import math
from typing import Hashable, Optional, Sequence

import torch

from .forecast import FeatureHistory
from .precision import unpack


class CacheStore:
    def __init__(self, device: Optional[torch.device] = None, depth: int = 1, max_span: float = math.inf,
                 precision: str = "model"):
        self.device = device          # None: keep each feature where it was computed
        self.depth = depth            # full-step values a feature's forecast is drawn through: its order + 1
        self.max_span = max_span      # anchors further apart in time lower the order
        self.precision = precision    # how features are stored (precision.py)
        self._entries: dict = {}      # uuid -> {key: tensor or FeatureHistory}
        self.nbytes = 0
        self.peak_bytes = 0

    def _chunks(self, uuids: Sequence[Hashable], tensor: torch.Tensor):
        if tensor.shape[0] % len(uuids):
            raise ValueError(f"batch of {tensor.shape[0]} rows does not split into {len(uuids)} conds")
        return zip(uuids, tensor.chunk(len(uuids), dim=0))

    def _grown(self, delta: int) -> None:
        self.nbytes += delta
        self.peak_bytes = max(self.peak_bytes, self.nbytes)

    def _replace(self, entries: dict, key: Hashable, value) -> None:
        before = _size(entries[key]) if key in entries else 0
        entries[key] = value
        self._grown(_size(value) - before)

    def put(self, uuids: Sequence[Hashable], key: Hashable, tensor: torch.Tensor) -> None:
        """Store a copy as a plain entry."""
        for uuid, chunk in self._chunks(uuids, tensor):
            # a copy: ComfyUI's blocks update their inputs in place
            self._replace(self._entries.setdefault(uuid, {}), key, chunk.clone())

    def put_feature(self, uuids: Sequence[Hashable], key: Hashable, tensor: torch.Tensor, time: float,
                    exact: bool = True, precision: Optional[str] = None) -> None:
        """Every token of a feature computed at `time`: at a full step (`exact`)
        a new anchor of its history, otherwise a new base for every token.
        `precision` overrides the store's for this feature."""
        for uuid, chunk in self._chunks(uuids, tensor):
            entries = self._entries.setdefault(uuid, {})
            history = entries.get(key)
            before = _size(history) if history is not None else 0
            if not isinstance(history, FeatureHistory) or history.shape != chunk.shape:
                history = FeatureHistory(self.depth, self.max_span, precision=precision or self.precision,
                                         device=self.device)
                exact = True
            if exact:
                history.put(chunk, time)
            else:
                history.refresh(None, chunk, time)
            entries[key] = history
            self._grown(_size(history) - before)

    def has(self, uuids: Sequence[Hashable], key: Hashable) -> bool:
        return all(key in self._entries.get(uuid, {}) for uuid in uuids)

    def shape(self, uuid: Hashable, key: Hashable) -> torch.Size:
        return self._entries[uuid][key].shape

    def get(self, uuids: Sequence[Hashable], key: Hashable, device: torch.device) -> torch.Tensor:
        """The entry as last computed (a feature's newest values)."""
        return _joined([_newest(self._entries[uuid][key], device) for uuid in uuids], device)

    def estimate(self, uuids: Sequence[Hashable], key: Hashable, device: torch.device, time: float,
                 index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """A feature estimated at `time` (FeatureHistory.estimate), of the
        tokens `index` if given."""
        return _joined([self._entries[uuid][key].estimate(time, index, device) for uuid in uuids], device)

    def order_lowered(self, uuid: Hashable, key: Hashable) -> bool:
        """Whether anchors too far apart lower a feature's forecast order."""
        history = self._entries[uuid][key]
        return history.order() < history.order(math.inf)

    def scatter(self, uuids: Sequence[Hashable], key: Hashable, index: torch.Tensor, values: torch.Tensor,
                dim: int = 1, time: Optional[float] = None) -> None:
        """Write freshly computed rows `values` at token positions `index`; a
        feature's tokens get them as their base, computed at `time`."""
        for uuid, chunk in self._chunks(uuids, values):
            stored = self._entries[uuid][key]
            if isinstance(stored, FeatureHistory):
                before = stored.nbytes
                stored.refresh(index, chunk, time)
                self._grown(stored.nbytes - before)
            else:
                stored.index_copy_(dim, index.to(stored.device), chunk.to(stored.device, stored.dtype))

    def increment(self, uuids: Sequence[Hashable], key: Hashable) -> None:
        """Add 1 in place (staleness counters on a step that computed nothing)."""
        for uuid in uuids:
            self._entries[uuid][key] += 1

    def uuids(self):
        return list(self._entries)

    def block_bytes(self, uuid: Hashable, block: Hashable) -> int:
        """What block `block` will hold for one cond once every feature's
        history is full (depth terms), from what it holds now."""
        return sum(self._full_size(entry) for key, entry in self._entries.get(uuid, {}).items() if key[0] == block)

    def largest_feature_bytes(self, uuid: Hashable, block: Hashable) -> int:
        """The largest feature of block `block` for one cond, with a full history."""
        return max((self._full_size(entry) for key, entry in self._entries.get(uuid, {}).items()
                    if key[0] == block and isinstance(entry, FeatureHistory)), default=0)

    def _full_size(self, entry) -> int:
        """An entry's bytes once a feature's history holds all `depth` terms
        (they are of one size); a plain entry's as it is."""
        return entry.nbytes // len(entry.terms) * self.depth if isinstance(entry, FeatureHistory) else _size(entry)

    def drop_block(self, block: Hashable) -> None:
        """Forget every entry of block `block`, for every cond."""
        for entries in self._entries.values():
            for key in [key for key in entries if key[0] == block]:
                self._grown(-_size(entries.pop(key)))

    def clear(self) -> None:
        self._entries = {}
        self.nbytes = 0


def _newest(entry, device):
    return unpack(entry.terms[0], device=device) if isinstance(entry, FeatureHistory) else entry


def _joined(chunks, device):
    joined = chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=0)
    return joined.to(device, non_blocking=True)


def _size(entry) -> int:
    if isinstance(entry, FeatureHistory):
        return entry.nbytes
    return entry.numel() * entry.element_size()
