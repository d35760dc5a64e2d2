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

TokenCache plans in the space of the image/video tokens entering the first
block (each group says where a block gets and returns them): a P-step's plan
picks those tokens per block; a second token stream (text) and tokens a block
gets after them (HiDream's single blocks append text) are recomputed whole.
Where the first group names its text input too (diffusers' Flux), the plan is
over cat(text, image), as ComfyUI's Flux adapter plans: each stream gets its
part of it, and blocks that run on cat(text, image) get it whole. Predictor
training runs on image-token plans only (it is ComfyUI's, and no ComfyUI
family declares a text input).
"""
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.utils.checkpoint

from ...accel_core.memory import BlockCache, CacheLayout
from ...accel_core.run import BlockMode, staleness_key
from ...accel_core.tokencache import PlanningInput, call_for_autograd, map_block_args, map_tensors
from . import JOINT_TOKEN_LAYOUT, cross_attn_tokens, latent_tokens, plain_float_copy

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
    output_streams: tuple = ()   # stream of each output part, when it returns more than its own (joint attention: (0, 1))


@dataclass(frozen=True)
class BlockGroup:
    path: str                                   # ModuleList in the diffusion model, e.g. "blocks"
    modules: Sequence[CachedModule]
    passthrough: Callable[[tuple, dict], Any]   # what a block returns when skipped: its input, in its output structure
    token_input: tuple = (0, "x")               # (position, keyword) of the image/video tokens in a block call
    token_output: Optional[int] = None          # their place in the block's output tuple (None: the output is them)
    text_in_tokens: bool = False                # those tokens carry the text too (one joint stream)
    text_input: Optional[tuple] = None          # (position, keyword) of the text tokens: plan cat(text, image)
    text_output: Optional[int] = None           # their place in the block's output tuple


POSITIONAL = "positional_args"   # a block call as one dict (TokenCache's block args): positional args + keywords


def call_dict(args, kwargs) -> dict:
    return {POSITIONAL: tuple(args), **kwargs}


def split_call(block_args: dict):
    return block_args[POSITIONAL], {k: v for k, v in block_args.items() if k != POSITIONAL}


def _tokens_of(args, kwargs, slot):
    position, name = slot
    return args[position] if len(args) > position else kwargs[name]


def _with_tokens(args, kwargs, slot, x):
    position, name = slot
    if len(args) > position:
        return (*args[:position], x, *args[position + 1:]), kwargs
    return args, {**kwargs, name: x}


class _ClassForward(torch.nn.Module):
    """A block run by its class's own forward: object patches on the block
    instance (a recorder's, a cache's) are not in the way."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, args, kwargs):
        return type(self.block).forward(self.block, *args, **kwargs)


def text_and_image(args, kwargs):
    """(text, image) of a block called as block(hidden_states, encoder_hidden_states, ...), in
    diffusers' naming, which is what such blocks return (Qwen-Image; diffusers' Flux)."""
    image = args[0] if args else kwargs["hidden_states"]
    text = args[1] if len(args) > 1 else kwargs["encoder_hidden_states"]
    return text, image


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
        self.changes = {}         # stream -> its tokens' change since the last computed step (TokenCache)


def _first_tensor(args, kwargs) -> torch.Tensor:
    return next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.ndim >= 2)


class ModulewiseAdapter:
    """Declared roles of a family's block submodules, and the patches that act on them."""

    family_key = ""   # set by families.adapter_for
    selectors = SELECTORS
    token_layout = "the image/video tokens entering the first block"

    def __init__(self, diffusion_model, family: str, groups: Sequence[BlockGroup], output_layer: str,
                 autograd_through_blocks: bool = True, patch=None, text_tokens=cross_attn_tokens):
        self.family = family
        self.patch = diffusion_model.patch_size if patch is None else patch   # latent values per token, per dimension
        self.text_tokens = text_tokens   # cond entry -> text tokens the blocks see
        # False where the blocks add to tensors autograd has saved (in place): no training runs through them
        self.autograd_through_blocks = autograd_through_blocks
        self.diffusion_model = diffusion_model
        self.output_layer = output_layer   # the first module after the blocks: LoRA refinement is trained on its output
        self.blocks = []      # (object path, block module, group)
        for group in groups:
            for i, block in enumerate(diffusion_model.get_submodule(group.path)):
                self.blocks.append((f"diffusion_model.{group.path}.{i}", block, group))
        if not self.blocks:
            raise ValueError(f"{family} model has no transformer blocks to cache")
        self.last_block = len(self.blocks) - 1
        self.block_count = len(self.blocks)
        self.call: Optional[_BlockCall] = None
        self.joint_plan = self.blocks[0][2].text_input is not None   # TokenCache plans cat(text, image)
        if self.joint_plan:
            self.token_layout = JOINT_TOKEN_LAYOUT
        self.planned_tokens = 0   # tokens in TokenCache's planning space at the evaluation under way
        self.planned_text = 0     # of which text, at its start

    # -- what the cache will hold ------------------------------------------------
    def cache_layout(self, latent_shape, text_tokens: int, dtype_bytes: int) -> CacheLayout:
        """Per block: every output part of its cached modules over the tokens of
        its stream, a staleness counter per stream, a selector input per
        token-wise module; the last block's output (a text part only where
        that block still has a text stream)."""
        image = latent_tokens(latent_shape, self.patch)
        blocks = []
        for _, _, group in self.blocks:
            tokens = (image + text_tokens if group.text_in_tokens else image, text_tokens)
            features = [tokens[stream] for spec in group.modules for stream in spec.output_streams or (spec.stream,)]
            streams = sorted({spec.stream for spec in group.modules})
            subsets = [tokens[spec.stream] for spec in group.modules if spec.role == SUBSET]
            blocks.append(BlockCache(tuple(features), tuple(tokens[s] for s in streams), tuple(subsets)))
        first = self.blocks[0][2]
        planned = image + text_tokens if first.text_in_tokens or self.joint_plan else image
        blocks = [BlockCache(b.features, b.counters, b.selector_inputs, planned) for b in blocks]
        last = self.blocks[-1][2]
        final = (tokens[0],) if last.token_output is None else tuple(
            tokens[0 if i == last.token_output else 1] for i in range(2)
            if i == last.token_output or any(spec.stream == 1 for spec in last.modules))
        return CacheLayout(self.hidden, dtype_bytes, tuple(blocks), final)

    def install(self, model_patcher, hooks):
        def object_patch(path, wrap):
            forward = model_patcher.get_model_object(f"{path}.forward")
            model_patcher.add_object_patch(f"{path}.forward", wrap(forward))
        self.replace_forwards(object_patch, hooks.current_run)

    def replace_forwards(self, replace, current_run):
        """replace(path, wrap): the host's way of putting wrap(its forward) in
        place of the forward of the module at `path` (ComfyUI: an object patch
        of the clone; diffusers: a hook). current_run(): the run under way."""
        for block_id, (path, block, group) in enumerate(self.blocks):
            replace(path, lambda forward, b=block_id, g=group: functools.partial(self._block, current_run, b, g, forward))
            for spec in group.modules:
                flops = _linear_flops(block.get_submodule(spec.work_of or spec.path), spec.context_linears)
                replace(f"{path}.{spec.path}", lambda forward, b=block_id, m=spec, f=flops:
                        functools.partial(self._module, current_run, b, m, forward, f))

    # -- block ------------------------------------------------------------------
    @torch.compiler.disable   # the cache's Python state stays out of torch.compile's graphs (nodes/patcher.py)
    def _block(self, current_run, block_id, group, forward, *args, **kwargs):
        run = current_run()
        if run is None or run.plan is None:
            return forward(*args, **kwargs)
        if block_id == 0 and run.planner is not None:
            tokens = self._planning_tokens(group, args, kwargs)
            self.planned_tokens = tokens.shape[1]
            run.plan_tokens(self.planned_tokens, lambda: PlanningInput(tokens, call_dict(args, kwargs)))
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
        if call.changes:
            self._note_changes(run, block_id, group, call.changes)
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
        if spec.role == SUBSET and run.planner is not None and (spec.stream == 0 or self.joint_plan):
            # TokenCache's training-free score: how much the block's token-wise output changed
            self.call.changes[spec.stream] = run.token_change(block_id, key + "0", _flatten(output)[0])
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
            if run.planner is not None:
                index = self._planned_selection(run, block_id, spec.stream, x.shape[1], x.device)
            else:
                index = run.select(block_id, x.shape[1], run.selector_scores(block_id, x, prefix=key), x.device,
                                   spec.stream)
            self.call.selection[spec.stream] = index
        return index

    def _planned_selection(self, run, block_id, stream, tokens, device):
        """TokenCache's plan for the image/video tokens; text streams and tokens
        after the planned ones are recomputed. A plan over cat(text, image):
        each stream's part of it, or all of it where the block's tokens are cat(text, image)."""
        if self.joint_plan:
            index = run.select(block_id, self.planned_tokens, None, device)
            if self._group(block_id).text_in_tokens:
                return index
            text = self.planned_text
            return index[index >= text] - text if stream == 0 else index[index < text]
        if stream != 0:
            return torch.arange(tokens, device=device)
        index = run.select(block_id, self.planned_tokens, None, device)
        if tokens > self.planned_tokens:
            index = torch.cat((index, torch.arange(self.planned_tokens, tokens, device=device)))
        return index

    def _planning_tokens(self, group, args, kwargs) -> torch.Tensor:
        """What enters the first block in the planning space: its image tokens, after its text where the plan holds text."""
        image = _tokens_of(args, kwargs, group.token_input)
        if not self.joint_plan:
            return image
        text = _tokens_of(args, kwargs, group.text_input)
        self.planned_text = text.shape[1]
        return torch.cat((text, image), dim=1)

    def _note_changes(self, run, block_id, group, changes):
        """The block's change per planned token: its image stream's (text first where the plan holds text)."""
        joint_streams = self.joint_plan and not group.text_in_tokens
        parts = [changes.get(1), changes.get(0)] if joint_streams else [changes.get(0)]
        run.put_change(block_id, parts, tokens=self.planned_tokens)

    # -- the last block's output, estimated by aggressive steps ----------------------
    def _store_output(self, run, output):
        _state(run).final = OutputLayout.of(output)
        run.put_final(*_flatten(output))

    def _cached_output(self, run, device):
        layout = _state(run).final
        return layout.rebuild([run.get_final(device, part=j) if present else None
                               for j, present in enumerate(layout.present)])

    # -- TokenCache: the planning space, the first-block predictor, training ------
    @property
    def hidden(self) -> int:
        """Width of the image/video tokens: the input features of the first
        linear layer of the first block's first image-stream module."""
        path, block, group = self.blocks[0]
        for spec in group.modules:
            if spec.stream == 0:
                weights = [p for n, p in block.get_submodule(spec.path).named_parameters()
                           if n.endswith("weight") and p.ndim == 2]
                if weights:
                    return weights[0].shape[1]
        raise ValueError(f"{self.family}: no image-token layer in the first block to read the token width from")

    @property
    def first_block_kind(self) -> str:
        return self.blocks[0][2].path

    def _group(self, block_id):
        return self.blocks[block_id][2]

    def predictor_block(self, for_training: bool = True) -> torch.nn.Module:
        """A float32 CPU copy of the first block (plain_float_copy)."""
        return plain_float_copy(self.blocks[0][1], for_training)

    def predictor_runner(self) -> "ModulewiseBlockRunner":
        return ModulewiseBlockRunner(self._group(0), self.hidden)

    def predictor_parts(self):
        return self.predictor_block(for_training=False), self.predictor_runner(), self.first_block_kind

    def block_layout(self) -> dict:
        counts = {}
        for _, _, group in self.blocks:
            counts[group.path] = counts.get(group.path, 0) + 1
        return counts

    def block_paths(self):
        """(path in the diffusion model, block) of every block, in the run's block numbering."""
        return [(path[len("diffusion_model."):], block) for path, block, _ in self.blocks]

    def wrap_block(self, model_patcher, block_id: int, wrapper) -> None:
        """wrapper(call, block_args) -> output around block `block_id` of the
        patched clone; block_args is the call as one dict (call_dict)."""
        path = f"{self.blocks[block_id][0]}.forward"
        forward = model_patcher.get_model_object(path)

        def wrapped(*args, **kwargs):
            return wrapper(lambda block_args: forward(*block_args[POSITIONAL], **split_call(block_args)[1]),
                           call_dict(args, kwargs))
        model_patcher.add_object_patch(path, wrapped)

    def copy_tokens(self, block_id: int, block_args: dict, copy=torch.Tensor.clone) -> dict:
        """block_args with the token input copied by `copy` (blocks may update it in place)."""
        args, kwargs = split_call(block_args)
        slot = self._group(block_id).token_input
        return call_dict(*_with_tokens(args, kwargs, slot, copy(_tokens_of(args, kwargs, slot))))

    def tokens_in(self, block_id: int, block_args: dict, count: Optional[int] = None) -> torch.Tensor:
        x = _tokens_of(*split_call(block_args), self._group(block_id).token_input)
        return x if count is None else x[:, :count]

    def tokens_out(self, block_id: int, output, count: Optional[int] = None) -> torch.Tensor:
        index = self._group(block_id).token_output
        x = output if index is None else output[index]
        return x if count is None else x[:, :count]

    def rest_of_inputs(self, block_id: int, block_args: dict, count: int) -> dict:
        """The block's inputs besides the first `count` tokens (those after them stay)."""
        args, kwargs = split_call(block_args)
        slot = self._group(block_id).token_input
        return call_dict(*_with_tokens(args, kwargs, slot, _tokens_of(args, kwargs, slot)[:, count:]))

    def text_length(self, block_args: dict) -> int:
        return 0   # the planning space holds no text tokens

    def output_tokens(self, x: torch.Tensor, count: int) -> torch.Tensor:
        """The tokens the output layer reads: the first `count` (image tokens come first)."""
        return x[:, :count]

    def block_contribution(self, block_id: int, x: torch.Tensor, block_args: dict, txt_len: int,
                           dtype: torch.dtype) -> torch.Tensor:
        """f_l(x) = block(x) - x for the planned tokens x, through the model's
        own block l in `dtype`, with its other inputs from rest_of_inputs
        (autograd reaches x; activations are recomputed in the backward pass)."""
        x = x.to(dtype)
        args, kwargs, _ = self._call_on(block_id, x, block_args)
        out = torch.utils.checkpoint.checkpoint(call_for_autograd, _ClassForward(self.blocks[block_id][1]), args,
                                                kwargs, use_reentrant=False)
        return self.tokens_out(block_id, out, x.shape[1]) - x

    def _call_on(self, block_id: int, x: torch.Tensor, block_args: dict):
        """(args, kwargs) of block l on the planned tokens x followed by the
        tokens rest_of_inputs kept after them, and how many those are."""
        slot = self._group(block_id).token_input
        args, kwargs = split_call(block_args)
        after = _tokens_of(args, kwargs, slot)
        # a new tensor: blocks may add to their input in place
        tokens = torch.cat((x, after.to(x.dtype)), dim=1) if after.shape[1] else x.clone()
        return (*_with_tokens(args, kwargs, slot, tokens), after.shape[1])


    def record_block(self, block_id: int, call, block_args: dict):
        """(output, branches): the block run as it is, with the outputs of its
        cached submodules, which a P-step reuses."""
        path, block, group = self.blocks[block_id]
        branches, handles = {}, []
        for spec in group.modules:
            def keep(module, args, output, name=spec.path):
                branches.setdefault(name, map_tensors(output, torch.Tensor.detach))
            handles.append(block.get_submodule(spec.path).register_forward_hook(keep))
        try:
            return call(block_args), branches
        finally:
            for handle in handles:
                handle.remove()

    def p_step_contribution(self, block_id: int, x: torch.Tensor, block_args: dict, txt_len: int,
                            dtype: torch.dtype, a: torch.Tensor, cached: dict) -> torch.Tensor:
        """Block l's contribution at a P-step where token t is recomputed to the
        degree a[:, t]: its "reuse" submodules return their output of the last
        computed step (`cached`, from record_block), its image-token "subset"
        ones a * fresh + (1 - a) * cached; text streams and tokens after the
        planned ones are recomputed (a = 1), as _module does with hard selections."""
        x = x.to(dtype)
        path, block, group = self.blocks[block_id]
        args, kwargs, after = self._call_on(block_id, x, block_args)
        a = torch.cat((a, a.new_ones(a.shape[0], after)), dim=1)
        out = torch.utils.checkpoint.checkpoint(_p_step_run, block, group, args, kwargs, a, cached,
                                                use_reentrant=False)
        return self.tokens_out(block_id, out, x.shape[1]) - x


def _like(cached, output):
    """`cached` (a module's recorded output) on the device and in the dtype of `output`."""
    if isinstance(output, torch.Tensor):
        return cached.to(output.device, output.dtype)
    return type(output)(c if c is None else c.to(o.device, o.dtype) for c, o in zip(cached, output))


def _p_step_run(block, group, args, kwargs, a, cached):
    """The block by its own forward with its cached submodules' outputs
    replaced as at a P-step (hooks set inside, so a checkpoint's recomputation
    sees them too)."""
    def reuse(module, inputs, output, name):
        return _like(cached[name], output)

    def subset(module, inputs, output, name):
        parts = _flatten(output)
        fresh = parts[0]
        weight = a[..., None].to(fresh.dtype)
        parts[0] = weight * fresh + (1 - weight) * _flatten(cached[name])[0].to(fresh.device, fresh.dtype)
        return OutputLayout.of(output).rebuild(parts)
    handles = []
    for spec in group.modules:
        if spec.role == REUSE:
            hook = reuse
        elif spec.stream == 0:
            hook = subset
        else:
            continue   # text streams are recomputed at P-steps
        handles.append(block.get_submodule(spec.path).register_forward_hook(functools.partial(hook, name=spec.path)))
    try:
        return call_for_autograd(_ClassForward(block), args, kwargs)
    finally:
        for handle in handles:
            handle.remove()


class ModulewiseBlockRunner:
    """How FirstBlockPredictor runs its copy of a modulewise family's first
    block: on the first block's own inputs, cast to the copy's dtype."""

    def __init__(self, group: BlockGroup, hidden: int):
        self.group = group
        self.hidden = hidden

    def __call__(self, block, inputs: PlanningInput):
        dtype = next(block.parameters()).dtype
        args, kwargs = split_call(map_block_args(inputs.block_args,
                                                 lambda t: t.to(dtype) if t.is_floating_point() else t))
        # a copy: blocks may add to their input in place, and at inference it is the model's own
        for slot in (self.group.token_input, self.group.text_input):
            if slot is not None:
                args, kwargs = _with_tokens(args, kwargs, slot, _tokens_of(args, kwargs, slot).clone())
        out = type(block).forward(block, *args, **kwargs)
        tokens = out if self.group.token_output is None else out[self.group.token_output]
        if self.group.text_input is not None:
            return torch.cat((out[self.group.text_output], tokens), dim=1)
        return tokens[:, :inputs.tokens.shape[1]]

    def flops(self, block, tokens: int) -> float:
        """One row's work, as an estimate: every linear layer on every token, and attention."""
        return tokens * _linear_flops(block) + 4 * tokens * tokens * self.hidden
