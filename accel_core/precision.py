"""The precision cached features are stored in.

Cached block outputs dominate a token cache's memory (video: tens of GiB),
and they only stand in for values within the model's own rounding noise, so
they can be kept narrower than computed:
- "model": as computed (bit-identical to computing them again, to the dtype);
- "bf16": 2 bytes per value; the same as "model" for bf16 and fp16 models;
- "fp8": 1 byte per value (float8 e4m3) with one float32 scale per token, so
  every token uses the format's full range whatever its magnitude. Tensors
  without a separate hidden dimension after the token one fall back to bf16,
  and the model's last hidden state stays bf16 (final_precision).
Values always come back in the dtype they were computed in.

A cache kept in CPU memory (cache_device cpu) for a model on a GPU lives in
pinned memory: copies both ways are asynchronous, ordered on the compute
stream, and a stored tensor is never changed in place by the host (a write
stores a new copy), so no copy in flight is ever read or overwritten early.
"""
from dataclasses import dataclass
from typing import Optional

import torch

PRECISIONS = ("model", "bf16", "fp8")
FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)
FP8_SCALE_BYTES = 4   # float32 scale per token


@dataclass
class Packed:
    """One stored tensor: `data` in its storage format (fp8 as its uint8 bits,
    which index and copy on every device), the dtype it reads back in, and
    for fp8 a float32 scale per token (data * scale = value)."""
    data: torch.Tensor
    dtype: torch.dtype
    scale: Optional[torch.Tensor] = None

    @property
    def nbytes(self) -> int:
        size = self.data.numel() * self.data.element_size()
        return size + (self.scale.numel() * self.scale.element_size() if self.scale is not None else 0)

    @property
    def shape(self) -> torch.Size:
        return self.data.shape


def final_precision(precision: str) -> str:
    """The model's last hidden state is kept at bf16 at least: aggressive steps
    hand its estimate straight to the output layer, where fp8's rounding shows
    in the image (measured: FORA N=5 -1.0 dB with it in fp8), and it is one
    block output among dozens."""
    return "bf16" if precision == "fp8" else precision


def store_on(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy of `tensor` on `device`: pinned and asynchronous from a GPU to the CPU."""
    if device.type == "cpu" and tensor.device.type == "cuda":
        stored = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        return stored.copy_(tensor, non_blocking=True)
    return tensor.to(device, copy=True)


def _fp8(value: torch.Tensor):
    """(uint8 bits of value / scale in float8 e4m3, the per-token scale)."""
    value = value.float()
    scale = (value.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    return (value / scale).to(FP8).view(torch.uint8), scale


def _fits_fp8(value: torch.Tensor, dim: int) -> bool:
    return value.is_floating_point() and value.dim() >= 3 and dim < value.dim() - 1


def _storage(value: torch.Tensor, precision: str, dim: int) -> str:
    """How `value` is stored at `precision`: "fp8" (with a scale per token),
    "bf16", or "as computed" (already that narrow, or not a float)."""
    if precision not in PRECISIONS:
        raise ValueError(f"cache_precision={precision!r}: accepted {', '.join(PRECISIONS)}")
    if precision == "fp8" and _fits_fp8(value, dim):
        return "fp8"
    if precision in ("bf16", "fp8") and value.is_floating_point() and value.element_size() > 2:
        return "bf16"
    return "as computed"


def packed_bytes(value: torch.Tensor, precision: str, dim: int = 1) -> int:
    """What pack(value, precision) would store, without storing it."""
    storage = _storage(value, precision, dim)
    if storage == "fp8":
        return value.numel() + value.numel() // value.shape[-1] * FP8_SCALE_BYTES
    return value.numel() * (2 if storage == "bf16" else value.element_size())


def stored_bytes(tokens: int, width: int, dtype_bytes: int, precision: str) -> int:
    """What pack() stores of a float feature of `tokens` x `width` values
    computed at `dtype_bytes` per value: packed_bytes without the tensor."""
    if precision == "fp8":
        return tokens * width + tokens * FP8_SCALE_BYTES
    return tokens * width * (min(2, dtype_bytes) if precision == "bf16" else dtype_bytes)


def pack(value: torch.Tensor, precision: str, device: Optional[torch.device] = None, dim: int = 1) -> Packed:
    """A stored copy of `value` (on `device`, or where it is); `dim` is its token dimension."""
    device = value.device if device is None else device
    storage = _storage(value, precision, dim)
    if storage == "fp8":
        data, scale = _fp8(value)
        return Packed(store_on(data, device), value.dtype, store_on(scale, device))
    if storage == "bf16":
        return Packed(store_on(value.to(torch.bfloat16), device), value.dtype)
    # a copy: ComfyUI's blocks update their inputs in place
    return Packed(store_on(value, device), value.dtype)


def unpack(packed: Packed, index: Optional[torch.Tensor] = None, dim: int = 1,
           device: Optional[torch.device] = None) -> torch.Tensor:
    """The stored values (only the tokens `index` along `dim`, if given), in
    their computed dtype, on `device` (default: where they are stored),
    decoded there. At precision "model", on the storage device and without
    `index`, this is the stored tensor itself, not a copy."""
    data, scale = packed.data, packed.scale
    if device is not None and data.device != device:
        data = data.to(device, non_blocking=True)
        scale = scale.to(device, non_blocking=True) if scale is not None else None
    if index is not None:
        index = index.to(data.device)
        data = data.index_select(dim, index)
        scale = scale.index_select(dim, index) if scale is not None else None
    if scale is not None:
        return (data.view(FP8).float() * scale).to(packed.dtype)
    return data if data.dtype == packed.dtype else data.to(packed.dtype)


def write(packed: Packed, index: torch.Tensor, values: torch.Tensor, dim: int = 1) -> None:
    """Store fresh `values` of the tokens `index`: in place where they are
    computed; kept elsewhere (CPU memory), updated where they are computed
    and stored again as a new copy."""
    home, here = packed.data.device, values.device
    fresh, scale = _fp8(values) if packed.scale is not None else (values.to(packed.data.dtype), None)
    if home == here:
        index = index.to(home)
        packed.data.index_copy_(dim, index, fresh)
        if scale is not None:
            packed.scale.index_copy_(dim, index, scale)
        return
    index = index.to(here)
    packed.data = store_on(packed.data.to(here, non_blocking=True).index_copy_(dim, index, fresh), home)
    if scale is not None:
        packed.scale = store_on(packed.scale.to(here, non_blocking=True).index_copy_(dim, index, scale), home)
