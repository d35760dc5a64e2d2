"""TokenCache's refinement of the last blocks (arXiv 2409.18523, sec. 3.4):
low-rank adapters on the linear layers of the blocks that always compute in
full, trained with the base model frozen so they repair what caching in the
earlier blocks costs. They act only where caching is active (P-steps): a
full step runs the model as it is.

An adapter adds scale * up(down(x)) to a linear layer's output. `up` starts
at zero, so an untrained adapter leaves the model's output unchanged.
"""
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence

import torch
from torch import nn

TENSOR_PREFIX = "lora."   # adapter tensors in a predictor file: lora.<layer path>.down / .up


class LowRankAdapter(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float):
        super().__init__()
        if rank < 1 or in_features < 1 or out_features < 1:
            raise ValueError(f"LowRankAdapter(in={in_features}, out={out_features}, rank={rank}): expected all >= 1")
        self.rank = rank
        self.scale = alpha / rank
        self.down = nn.Parameter(torch.empty(rank, in_features))
        self.up = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.down, a=5 ** 0.5)
        self._cast = {}   # (device, dtype, weight versions) -> (down, up), for inference

    def flops(self, tokens: int) -> float:
        """Two FLOPs per weight of down and up, per token."""
        return 2.0 * (self.down.numel() + self.up.numel()) * tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.down.requires_grad:
            down, up = self.down.to(x.dtype), self.up.to(x.dtype)
        else:
            # inference: one cast copy per device and dtype, made again only when the weights change
            key = (x.device, x.dtype, _version(self.down), _version(self.up))
            if key not in self._cast:
                self._cast = {key: (self.down.detach().to(x.device, x.dtype), self.up.detach().to(x.device, x.dtype))}
            down, up = self._cast[key]
        return nn.functional.linear(nn.functional.linear(x, down), up) * self.scale


def _version(tensor: torch.Tensor) -> int:
    """How often the tensor was changed in place; tensors made in inference mode
    (loaded inside ComfyUI's nodes) keep no count and are not trained."""
    return 0 if tensor.is_inference() else tensor._version


@dataclass(frozen=True)
class LoRASpec:
    """What a predictor file's adapters were made for (its metadata "lora")."""
    rank: int
    alpha: float
    blocks: tuple            # block ids (the run's numbering) the adapters sit in
    layers: tuple            # paths of the linear layers, relative to the diffusion model

    def to_metadata(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "blocks": list(self.blocks), "layers": list(self.layers)}

    @classmethod
    def from_metadata(cls, value) -> "LoRASpec":
        if not isinstance(value, dict) or not {"rank", "alpha", "blocks", "layers"} <= set(value):
            raise ValueError(f"metadata 'lora' must be an object with rank, alpha, blocks and layers; got {str(value)[:80]}")
        return cls(int(value["rank"]), float(value["alpha"]), tuple(int(b) for b in value["blocks"]),
                   tuple(str(layer) for layer in value["layers"]))


class BlockLoRA(nn.Module):
    """The adapters of one model, keyed by layer path."""

    def __init__(self, spec: LoRASpec, shapes: Dict[str, tuple]):
        super().__init__()
        self.spec = spec
        missing = [layer for layer in spec.layers if layer not in shapes]
        if missing:
            raise ValueError(f"no linear layer for adapters {', '.join(missing[:3])}")
        self.adapters = nn.ModuleDict({_key(layer): LowRankAdapter(*shapes[layer], spec.rank, spec.alpha)
                                       for layer in spec.layers})

    def adapter(self, layer: str) -> LowRankAdapter:
        return self.adapters[_key(layer)]

    def tensors(self) -> Dict[str, torch.Tensor]:
        return {f"{TENSOR_PREFIX}{layer}.{part}": getattr(self.adapter(layer), part).detach().cpu().contiguous()
                for layer in self.spec.layers for part in ("down", "up")}

    def load_tensors(self, tensors: Dict[str, torch.Tensor]) -> None:
        """Weights from a file's lora.* tensors; ValueError naming what does not fit."""
        expected = set(self.tensors())
        if set(tensors) != expected:
            extra, absent = sorted(set(tensors) - expected), sorted(expected - set(tensors))
            raise ValueError(f"adapter tensors do not match the layers listed (unlisted: {extra[:3]}, absent: {absent[:3]})")
        for layer in self.spec.layers:
            adapter = self.adapter(layer)
            for part in ("down", "up"):
                value = tensors[f"{TENSOR_PREFIX}{layer}.{part}"]
                if value.shape != getattr(adapter, part).shape:
                    raise ValueError(f"adapter {layer}.{part} has shape {tuple(value.shape)}; the model's layer "
                                     f"needs {tuple(getattr(adapter, part).shape)}")
                getattr(adapter, part).data.copy_(value)


def _key(layer: str) -> str:
    return layer.replace(".", "/")   # ModuleDict keys cannot hold dots


def linear_layers(blocks: Sequence[tuple]) -> Dict[str, tuple]:
    """(in, out) features of every linear layer of the given (path, block module) pairs, by path."""
    return {f"{path}.{name}": (module.in_features, module.out_features)
            for path, block in blocks for name, module in block.named_modules()
            if isinstance(module, nn.Linear)}


def check_lora_blocks(lora: BlockLoRA, block_count: int, protected_last_blocks: int, name: str) -> None:
    """A ValueError where the adapters sit in blocks that TokenCache caches: they refine blocks computed in full."""
    unprotected = [b for b in lora.spec.blocks if b < block_count - protected_last_blocks]
    if unprotected:
        raise ValueError(f"{name}: the predictor's LoRA adapters refine blocks {list(lora.spec.blocks)}, which "
                         f"must compute in full; protected_last_blocks={protected_last_blocks} leaves "
                         f"{unprotected} cached: use protected_last_blocks >= {block_count - min(lora.spec.blocks)}")


class AdapterRows:
    """Rows of an adapter's output: its part for one of the layers a fused
    layer is split into in another host (Flux's qkv as q, k and v in diffusers)."""

    def __init__(self, adapter: LowRankAdapter, rows: slice):
        self.adapter = adapter
        self.rows = rows

    def flops(self, tokens: int) -> float:
        return 2.0 * (self.adapter.down.numel() + self.adapter.up[self.rows].numel()) * tokens

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        down, up = self.adapter.down.to(x.dtype), self.adapter.up[self.rows].to(x.dtype)
        return nn.functional.linear(nn.functional.linear(x, down), up) * self.adapter.scale


def adapted_forward(original: Callable, adapter: LowRankAdapter, active: Callable[[], bool],
                    count: Optional[Callable[[float], None]], x, *args, **kwargs):
    """A linear layer's forward with its adapter added where active() says
    so; count(flops) is told the adapter's work there."""
    out = original(x, *args, **kwargs)
    if not active():
        return out
    if count is not None:
        count(adapter.flops(x.numel() // x.shape[-1]))
    return out + adapter(x).to(out.dtype)
