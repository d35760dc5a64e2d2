"""Token caching for DiT families through their blocks' own submodules.

Most DiT blocks call their attention, cross-attention and MLP as submodules
(Wan, Qwen-Image, PixArt, LTX-Video, Lumina 2, HiDream). Caching then needs
no copy of any forward code: the `forward` of each block and of those
submodules is replaced on the cloned model with ModelPatcher object patches
(restored when sampling ends, never global), and the block's own code keeps
doing normalisation, modulation, gating and residuals, per-token modulation
included. A family adapter only declares which submodules play which role:

- "reuse": the output is cached at full steps and returned as it is at
  conservative steps (self-attention, as in the research method);
- "subset": a token-wise module (MLP, cross-attention queries) that runs on the
  selected tokens only at conservative steps; its cached output gets their
  fresh rows.

Aggressive steps skip the blocks: each returns its input, the last one its
output estimated from the last computed steps.
"""
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from ...accel_core.run import BlockMode, staleness_key

REUSE, SUBSET = "reuse", "subset"
SELECTORS = ("random", "similarity")


@dataclass(frozen=True)
class CachedModule:
    path: str               # relative to the block, e.g. "self_attn", "ffn"
    role: str               # REUSE or SUBSET
    stream: int = 0         # token stream whose selection it follows (0 image, 1 text)
    input_name: str = ""    # keyword the block passes the token input by, when not positional
    context_linears: tuple = ()  # linear children run on another input (cross-attention K/V of text or image), not per token
    work_of: str = ""       # module whose linear layers count as this one's work, when it stands for more (SD3: attn.proj for attn)


@dataclass(frozen=True)
class BlockGroup:
    path: str                                   # ModuleList in the diffusion model, e.g. "blocks"
    modules: Sequence[CachedModule]
    passthrough: Callable[[tuple, dict], Any]   # what a block returns when skipped: its input, in its output structure


def block_input(args, kwargs):
    """The token input of a block called as block(x, ...) or block(x=...): what
    most single-stream blocks return unchanged when skipped."""
    return args[0] if args else kwargs["x"]


def _linear_flops(module, context_linears=()) -> int:
    """Two FLOPs per weight of every linear layer that runs on the module's tokens, per token."""
    return 2 * sum(p.numel() for n, p in module.named_parameters()
                   if n.endswith("weight") and p.ndim == 2 and n.split(".")[0] not in context_linears)


def _tokens_in(value) -> int:
    return value.shape[1] if isinstance(value, torch.Tensor) and value.ndim >= 3 else 0


def _flatten(output):
    return list(output) if isinstance(output, (tuple, list)) else [output]


@dataclass(frozen=True)
class OutputLayout:
    """How to rebuild a module's output from its cached tensors."""
    present: tuple        # per part: whether it is a tensor (cached) or None
    kind: type            # tuple, list, or the tensor type of a single output

    @classmethod
    def of(cls, output):
        return cls(tuple(p is not None for p in _flatten(output)), type(output))

    def rebuild(self, parts):
        return self.kind(parts) if self.kind in (tuple, list) else parts[0]


@dataclass
class BlockWork:
    flops_per_row: float
    tokens_per_row: float
    streams: int


@dataclass
class ModulewiseRunState:
    """What the engine learns about the model during one run (CacheRun.adapter_state)."""
    work: dict = field(default_factory=dict)      # block id -> BlockWork, from its last full step
    outputs: dict = field(default_factory=dict)   # (block id, module key) -> OutputLayout
    final: Optional[OutputLayout] = None          # the last block's output


def _state(run) -> ModulewiseRunState:
    if run.adapter_state is None:
        run.adapter_state = ModulewiseRunState()
    return run.adapter_state


class _BlockCall:
    """Mode, work, token counts and selections of one block call."""

    def __init__(self, mode):
        self.mode = mode
        self.full_flops = 0.0
        self.computed_flops = 0.0
        self.tokens = 0
        self.computed_tokens = 0
        self.stream_tokens = {}   # stream -> (tokens, device), as seen by its submodules
        self.selection = {}       # stream -> indices, shared by the stream's submodules


def _first_tensor(args, kwargs) -> torch.Tensor:
    return next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.ndim >= 2)


class ModulewiseAdapter:
    """Declared roles of a family's block submodules, and the patches that act on them."""

    family_key = ""   # set by families.adapter_for
    selectors = SELECTORS
    tokencache = False

    def __init__(self, diffusion_model, family: str, groups: Sequence[BlockGroup]):
        self.family = family
        self.blocks = []      # (object path, block module, group)
        for group in groups:
            for i, block in enumerate(diffusion_model.get_submodule(group.path)):
                self.blocks.append((f"diffusion_model.{group.path}.{i}", block, group))
        if not self.blocks:
            raise ValueError(f"{family} model has no transformer blocks to cache")
        self.last_block = len(self.blocks) - 1
        self.call: Optional[_BlockCall] = None

    def install(self, model_patcher, hooks):
        current_run = hooks.current_run
        for block_id, (path, block, group) in enumerate(self.blocks):
            forward = model_patcher.get_model_object(f"{path}.forward")
            model_patcher.add_object_patch(f"{path}.forward", functools.partial(self._block, current_run, block_id, group, forward))
            for spec in group.modules:
                module_path = f"{path}.{spec.path}.forward"
                forward = model_patcher.get_model_object(module_path)
                flops = _linear_flops(block.get_submodule(spec.work_of or spec.path), spec.context_linears)
                model_patcher.add_object_patch(module_path, functools.partial(self._module, current_run, block_id, spec, forward, flops))

    # -- block ------------------------------------------------------------------
    @torch.compiler.disable   # the cache's Python state stays out of torch.compile's graphs (nodes/patcher.py)
    def _block(self, current_run, block_id, group, forward, *args, **kwargs):
        run = current_run()
        if run is None or run.plan is None:
            return forward(*args, **kwargs)
        work = _state(run).work.get(block_id)
        mode = run.enter_block(block_id, work.streams if work is not None else 1)
        if mode is BlockMode.ESTIMATE:
            first = _first_tensor(args, kwargs)
            rows = first.shape[0]
            run.leave_block(rows * work.flops_per_row, 0, rows * work.tokens_per_row, 0)
            if block_id == self.last_block:
                return self._cached_output(run, first.device)
            return group.passthrough(args, kwargs)
        self.call = _BlockCall(mode)
        try:
            output = forward(*args, **kwargs)
        finally:
            call, self.call = self.call, None
        if mode is BlockMode.FULL or mode is BlockMode.FALLBACK:
            # every token computed: the work aggressive steps count, and the final state they estimate
            rows = _first_tensor(args, kwargs).shape[0]
            _state(run).work[block_id] = BlockWork(call.full_flops / rows, call.tokens / rows,
                                                   1 + max(call.stream_tokens, default=0))
            if mode is BlockMode.FULL:
                for stream, (tokens, device) in call.stream_tokens.items():
                    run.reset_staleness(block_id, tokens, device, stream)
            if block_id == self.last_block and run.plan.fill:
                self._store_output(run, output)
        run.leave_block(call.full_flops, call.computed_flops, call.tokens, call.computed_tokens)
        return output

    # -- submodules -------------------------------------------------------------
    def _module(self, current_run, block_id, spec, forward, per_token_flops, *args, **kwargs):
        run, call = current_run(), self.call
        if run is None or run.plan is None or call is None:
            return forward(*args, **kwargs)
        x = kwargs[spec.input_name] if spec.input_name else args[0]
        rows, tokens = x.shape[0], x.shape[1]
        full = rows * tokens * per_token_flops
        if spec.role == REUSE:
            # attention over every token of its inputs (joint attention: image and text)
            joint = sum(_tokens_in(a) for a in (*args, *kwargs.values()) if _tokens_in(a) and a.shape[-1] == x.shape[-1])
            full += rows * 4 * joint * joint * x.shape[-1]
        call.full_flops += full
        call.stream_tokens.setdefault(spec.stream, (tokens, x.device))
        if spec.stream == 0:
            call.tokens += rows * tokens
        key = spec.path + "#"
        if call.mode is not BlockMode.SUBSET or not self._cached(run, block_id, spec, key, tokens):
            output = forward(*args, **kwargs)
            call.computed_flops += full
            call.computed_tokens += rows * tokens if spec.stream == 0 else 0
            if call.mode is not BlockMode.FALLBACK:
                self._fill(run, block_id, spec, key, x, output)
            return output
        if spec.role == REUSE:
            return self._get_output(run, block_id, key, x.device)
        index = self._selection(run, block_id, spec, key, x)
        call.computed_flops += rows * index.numel() * per_token_flops
        call.computed_tokens += rows * index.numel() if spec.stream == 0 else 0
        if index.numel():
            if spec.input_name:
                fresh = forward(*args, **{**kwargs, spec.input_name: x[:, index]})
            else:
                fresh = forward(x[:, index], *args[1:], **kwargs)
            run.scatter_feature(block_id, key + "0", index, fresh)
        return self._get_output(run, block_id, key, x.device)

    def _fill(self, run, block_id, spec, key, x, output):
        for j, part in enumerate(_flatten(output)):
            if part is not None:
                run.put_feature(block_id, key + str(j), part)
        _state(run).outputs[(block_id, key)] = OutputLayout.of(output)
        if spec.role == SUBSET:
            run.keep_selector_feature(block_id, x, prefix=key)

    def _cached(self, run, block_id, spec, key, tokens) -> bool:
        """Whether this module has a cache of the right size; otherwise it
        computes in full (and says so once)."""
        reason = None
        if not run.has(block_id, key + "0") or (spec.role == SUBSET and not run.has(block_id, staleness_key(spec.stream))):
            reason = "no cache from the last full step (another node replaced the block?)"
        elif run.cached_shape(block_id, key + "0")[1] != tokens:
            reason = "a token count that changed since the last full step"
        if reason is None:
            return True
        run.stats.warn_once(f"{run.name}: {self.family} {spec.path} with {reason} computes in full")
        return False

    def _get_output(self, run, block_id, key, device):
        layout = _state(run).outputs[(block_id, key)]
        # copies: the block may update what it is given in place
        return layout.rebuild([run.estimate(block_id, key + str(j), device).clone() if present else None
                               for j, present in enumerate(layout.present)])

    def _selection(self, run, block_id, spec, key, x):
        """One selection per block and stream, shared by the stream's submodules."""
        index = self.call.selection.get(spec.stream)
        if index is None:
            index = run.select(block_id, x.shape[1], run.selector_scores(block_id, x, prefix=key), x.device, spec.stream)
            self.call.selection[spec.stream] = index
        return index

    # -- the last block's output, estimated by aggressive steps ----------------------
    def _store_output(self, run, output):
        _state(run).final = OutputLayout.of(output)
        run.put_final(*_flatten(output))

    def _cached_output(self, run, device):
        layout = _state(run).final
        return layout.rebuild([run.get_final(device, part=j) if present else None
                               for j, present in enumerate(layout.present)])
