"""State of one sampling run with token caching: the schedule, the cache, the
token selections and the work accounting. Framework-free: the ComfyUI side
calls begin_forward/end_forward around each model evaluation and the family
adapters call the block-level helpers."""
from dataclasses import dataclass
from typing import Callable, Hashable, Optional, Sequence

import torch

from .cache_store import CacheStore
from .config import CacheConfig
from .schedule import CacheSchedule, StepKind
from .selectors import pick_tokens, random_scores
from .stats import WorkStats
from .tokencache import PlanningInput, TokenPlanner, change_importance

FINAL = ("final", "hidden")   # cache key of the model's last hidden state, reused by aggressive steps


@dataclass
class ForwardPlan:
    step: int
    kind: StepKind
    fill: bool                 # this evaluation must leave a complete cache behind
    uuids: list


class CacheRun:
    def __init__(self, config: CacheConfig, sample_sigmas: Sequence[float], start_sigma: float,
                 end_sigma: float, name: str = "DuCa", planner: Optional[TokenPlanner] = None,
                 step_importance: Optional[Callable[[float], float]] = None):
        self.config = config
        self.name = name
        self.planner = planner           # TokenCache: per-block token choice at P-steps
        self.step_plans: dict = {}       # step -> {token count: indices per block}, shared by the step's evaluations
        self.sigma = None
        self.schedule = CacheSchedule(config, sample_sigmas, start_sigma, end_sigma, step_importance)
        self.store = CacheStore(torch.device("cpu") if config.cache_device == "cpu" else None)
        self.stats = WorkStats()
        self.plan: Optional[ForwardPlan] = None
        self.last_selection: dict = {}   # block id -> indices picked at the latest conservative step
        self.layout: dict = {}           # adapters' bookkeeping for this run (output structures, per-block work)
        self._signature = None

    # -- per model evaluation -------------------------------------------------
    def begin_forward(self, sigma: float, uuids: Sequence[Hashable], signature: tuple) -> ForwardPlan:
        """Decide what this evaluation computes. `signature` (latent shape,
        dtype, device, rows per cond) changing mid-run invalidates the cache."""
        if signature != self._signature:
            if self._signature is not None and self.store.uuids():
                self.stats.note_once(f"{self.name}: input changed from {self._signature} to {signature}; cache reset")
            self.store.clear()
            self._signature = signature
        step = self.schedule.step_of(sigma)
        self.sigma = sigma
        kind = self.schedule.kind(step)
        fill = kind is not StepKind.FULL or self.schedule.cache_needed_after(step)
        if kind is not StepKind.FULL and not self.store.has(uuids, FINAL):
            kind = StepKind.FULL   # nothing cached for these conds yet
        self.plan = ForwardPlan(step, kind, fill, list(uuids))
        self.stats.record_step(step, kind)
        self.stats.evaluations += 1
        return self.plan

    def end_forward(self) -> None:
        self.plan = None
        self.stats.peak_cache_bytes = self.store.peak_bytes

    def close(self) -> None:
        self.plan = None
        self.store.clear()

    # -- block-level helpers ----------------------------------------------------
    def put(self, block_id: int, name: str, tensor: torch.Tensor) -> None:
        self.store.put(self.plan.uuids, (block_id, name), tensor)

    def get(self, block_id: int, name: str, device: torch.device) -> torch.Tensor:
        return self.store.get(self.plan.uuids, (block_id, name), device)

    def has(self, block_id: int, name: str) -> bool:
        return self.store.has(self.plan.uuids, (block_id, name))

    def cached_shape(self, block_id: int, name: str) -> torch.Size:
        """Shape of one cond's entry, without moving it."""
        return self.store.shape(self.plan.uuids[0], (block_id, name))

    def scatter(self, block_id: int, name: str, index: torch.Tensor, values: torch.Tensor, dim: int = 1) -> None:
        self.store.scatter(self.plan.uuids, (block_id, name), index, values, dim)

    def put_final(self, hidden: torch.Tensor) -> None:
        self.store.put(self.plan.uuids, FINAL, hidden)

    def get_final(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        # a copy: ComfyUI (ControlNet) adds to a block's output in place
        return self.store.get(self.plan.uuids, FINAL, device).to(dtype=dtype, copy=True)

    def reset_staleness(self, block_id: int, tokens: int, device: torch.device, stream: int = 0) -> None:
        self.put(block_id, staleness_key(stream),
                 torch.zeros(len(self.plan.uuids), tokens, dtype=torch.int32, device=device))

    def age_all(self, block_id: int, streams: int = 1) -> None:
        """Aggressive step: no token of the block was computed."""
        for stream in range(streams):
            if self.has(block_id, staleness_key(stream)):
                self.store.increment(self.plan.uuids, (block_id, staleness_key(stream)))

    def computes_in_full(self, block_id: int) -> bool:
        """TokenCache's protected last blocks compute every token at P-steps too."""
        return self.planner is not None and self.planner.protected(block_id)

    def select(self, block_id: int, tokens: int, scores: Optional[torch.Tensor], device: torch.device,
               stream: int = 0) -> torch.Tensor:
        """Indices of the tokens this block recomputes at this conservative step,
        with staleness updated. `scores` is None for the random selector.
        `stream` tells apart the token streams of a two-stream block (image, text).
        With a TokenCache planner, the step's plan (plan_tokens) decides."""
        if self.planner is not None:
            return self._planned(block_id, tokens, device)
        staleness = self.get(block_id, staleness_key(stream), device)
        if scores is None:
            scores = random_scores(tokens, self.config.seed, self.plan.step, block_id + 1000 * stream).to(device)
        count = self.config.recompute_count(tokens)
        index = pick_tokens(scores, staleness.float().mean(dim=0), self.config.staleness_weight,
                            self.config.cycle_length, count)
        staleness = staleness + 1
        staleness[:, index] = 0
        self.put(block_id, staleness_key(stream), staleness)
        self.last_selection[block_id if stream == 0 else (block_id, stream)] = index
        return index

    def plan_tokens(self, tokens: int, make_inputs: Callable[[], PlanningInput]) -> None:
        """TokenCache: called at the first block with the evaluation's joint
        token count; at a P-step, choose every block's tokens for the step from
        make_inputs() (what enters the first block, built only then). One plan
        per step and token count, from the first cond's rows: conds of one
        layout (the only ones ComfyUI batches) share it, so batched and split
        CFG select alike. A cond with another text length gets its own: its
        text tokens are other tokens, and the allocation spends one budget on
        text and image tokens together. The predictor's work counts as
        computed work."""
        step = self.plan.step
        plans = self.step_plans.get(step, {})
        if self.planner is None or self.plan.kind is not StepKind.CONSERVATIVE or tokens in plans:
            return
        inputs = make_inputs()
        first = self.plan.uuids[:1]
        rows = inputs.tokens.shape[0] // len(self.plan.uuids)
        device = inputs.tokens.device
        changes = [self.store.get(first, (b, "change"), device)
                   if self.planner.uses_changes and self.store.has(first, (b, "change")) else None
                   for b in range(self.planner.n_blocks)]
        self.step_plans = {step: {**plans, tokens: self.planner.plan(inputs.rows(rows), self.sigma, changes, step)}}
        if self.planner.predictor is not None:
            self.stats.record_predictor(rows * self.planner.predictor.flops(inputs.tokens.shape[1]))

    def _planned(self, block_id: int, tokens: int, device: torch.device) -> torch.Tensor:
        plans = self.step_plans.get(self.plan.step, {}).get(tokens)
        if plans is None:
            raise RuntimeError(f"{self.name}: step {self.plan.step} has no token plan for {tokens} tokens; the family "
                               "adapter must call plan_tokens at the first block")
        index = plans[block_id].to(device)
        self.last_selection[block_id] = index
        return index

    def note_change(self, block_id: int, parts: Sequence[tuple]) -> None:
        """Before a full step overwrites a block's cached outputs (name, fresh)
        pairs, in token order: how much each token changed since the last
        computed step, the training-free TokenCache score."""
        if self.planner is None or not self.planner.uses_changes:
            return
        if all(self.has(block_id, name) for name, _ in parts):
            change = torch.cat([change_importance(fresh, self.get(block_id, name, fresh.device)) for name, fresh in parts], dim=1)
            self.put(block_id, "change", change)


def staleness_key(stream: int) -> str:
    return "staleness" if stream == 0 else f"staleness{stream}"
