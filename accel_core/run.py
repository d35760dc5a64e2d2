"""State of one sampling run with token caching: the schedule, the cache, the
token selections, the work accounting and the measured cache error.
Framework-free: the ComfyUI side calls begin_forward/end_forward around each
model evaluation and the family adapters call the block-level helpers.

Block outputs are "features": what a step does not compute is estimated from
their history at this step's time (forecast.FeatureHistory; reuse is order
0). A conservative step computes some tokens anyway: how far their fresh
values are from the estimate is the step's measured cache error, which the
error-aware schedule (config.max_error) turns into full steps added or saved.
"""
import enum
from dataclasses import dataclass
from typing import Callable, Hashable, Optional, Sequence

import torch

from .cache_store import CacheStore
from .precision import final_precision, packed_bytes
from .config import CacheConfig
from .schedule import CacheSchedule, StepKind
from .selectors import KEPT, kept_feature, pick_tokens, random_scores, token_scores
from .stats import WorkStats
from .tokencache import PlanningInput, TokenPlanner, change_importance


class BlockMode(enum.Enum):
    """What one block does at one evaluation: the run decides, the adapter computes."""
    FULL = "full"            # every token computed; fills the cache (at full steps, the trend forecasts follow)
    SUBSET = "subset"        # the selected tokens computed, every other value estimated from the cache
    ESTIMATE = "estimate"    # nothing computed: the block passes its input on, the last block's output is estimated
    FALLBACK = "fallback"    # the host's own block, nothing cached (why, when it matters, is logged once)


FINAL = "final"   # cache keys (FINAL, part) of the model's last hidden state, which aggressive steps estimate


@dataclass
class ForwardPlan:
    step: int
    kind: StepKind
    fill: bool                 # this evaluation must leave a complete cache behind
    uuids: list


class CacheRun:
    def __init__(self, config: CacheConfig, sample_sigmas: Sequence[float], start_sigma: float,
                 end_sigma: float, name: str = "DuCa", planner: Optional[TokenPlanner] = None,
                 step_importance: Optional[Callable[[float], float]] = None,
                 time_of: Callable[[float], float] = float, conds: int = 1):
        self.config = config
        self.time_of = time_of           # sigma -> the coordinate forecasts extrapolate in
        self.time = None
        self.name = name
        self.planner = planner           # TokenCache: per-block token choice at P-steps
        self.step_plans: dict = {}       # step -> {token count: indices per block}, shared by the step's evaluations
        self.sigma = None
        self.schedule = CacheSchedule(config, sample_sigmas, start_sigma, end_sigma, step_importance)
        self.store = CacheStore(torch.device("cpu") if config.cache_device == "cpu" else None,
                                depth=config.forecast_order + 1, max_span=config.forecast_max_span,
                                precision=config.cache_precision)
        self.conds = conds               # cond rows a step evaluates (cond, uncond, ...): what the budget projects by
        self.block_cached: dict = {}     # block id -> whether its cache fits the budget (decided once, in order)
        self._budget_used = 0.0          # projected bytes of the blocks cached so far and the final state
        self._block_bytes: dict = {}     # block id -> projected bytes, of the blocks cached
        self._final_reserved = 0.0       # what the budget holds for the final state until it is first stored
        self._block = None               # the block between enter_block and leave_block
        self.stats = WorkStats()
        self.plan: Optional[ForwardPlan] = None
        self.last_selection: dict = {}   # block id -> indices picked at the latest conservative step
        self.adapter_state = None        # the family adapter's own record of this run (its type is the adapter's)
        self._signature = None
        self._final_parts = None         # which parts of the last block's output are cached
        self._decided_step = None        # the step whose kind was last decided (once per step)
        self._measuring = None           # uuid whose rows measure this step's cache error
        self._error_sums = [0.0, 0.0]    # this step: sum ||fresh - estimate||^2, sum ||fresh||^2 (first cond)
        self._latest_error = None        # the last error measured since the last full step
        self._warn_if_nothing_caches()

    def _warn_if_nothing_caches(self) -> None:
        """Settings that leave nothing to cache are legal but never what the
        user meant: say so where the summary shows."""
        config, planner = self.config, self.planner
        window = sum(self.schedule.in_window)
        if config.mode == "tokencache" and 0 < window <= config.i_steps:
            self.stats.warn_once(f"{self.name}: caching is off: i_steps={config.i_steps} covers all {window} steps "
                                 f"of the caching window, so every step computes in full; use i_steps below {window}")
        if planner is not None and planner.protected_last_blocks >= planner.n_blocks:
            self.stats.warn_once(f"{self.name}: caching is off: protected_last_blocks={planner.protected_last_blocks} "
                                 f"covers all {planner.n_blocks} blocks of this model, so no block caches; use 0 to "
                                 f"{planner.n_blocks - 1}")

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
        self.time = self.time_of(sigma)
        if step != self._decided_step:
            self._decide(step, uuids[0])
        kind = self.schedule.kind(step)
        fill = kind is not StepKind.FULL or self.schedule.cache_needed_after(step)
        if kind is not StepKind.FULL and not self.has_final(uuids):
            kind = StepKind.FULL   # nothing cached for these conds yet
        self.plan = ForwardPlan(step, kind, fill, list(uuids))
        self.stats.record_step(step, kind)
        self.stats.evaluations += 1
        return self.plan

    def _decide(self, step: int, first_uuid) -> None:
        """Once per step, at its first evaluation: close the last step's error
        measurement and, under the error-aware schedule, let it add or save a
        full step. Only the first cond of a step measures, so batched and
        split CFG decide alike."""
        if self._decided_step in self.stats.step_errors:
            self._latest_error = self.stats.step_errors[self._decided_step]
        self._error_sums = [0.0, 0.0]
        self._decided_step = step
        max_error = self.config.max_error
        if max_error > 0 and self._latest_error is not None:
            if self._latest_error > max_error and self.schedule.force_full(step):
                self.stats.full_steps_added += 1
            elif self._latest_error < max_error / 2 and self.schedule.postpone_full(step):
                self.stats.full_steps_saved += 1
        if self.schedule.kind(step) is StepKind.FULL:
            self._latest_error = None
        self._measuring = first_uuid if self.schedule.kind(step) is StepKind.CONSERVATIVE else None

    def end_forward(self) -> None:
        squared_error, squared_norm = (float(total) for total in self._error_sums)
        if squared_norm > 0:
            self.stats.record_error(self.plan.step, (squared_error / squared_norm) ** 0.5)
        self.plan = None
        self.stats.peak_cache_bytes = self.store.peak_bytes

    def close(self) -> None:
        self.plan = None
        self.store.clear()

    # -- block-level helpers ----------------------------------------------------
    def enter_block(self, block_id: int, streams: int = 1,
                    unavailable: Optional[Callable[[], Optional[str]]] = None) -> BlockMode:
        """The block's mode at this evaluation. unavailable() says why the
        block cannot run cached (None where it can); asked only where it would."""
        kind = self.plan.kind
        self._block = block_id
        if kind is StepKind.AGGRESSIVE:
            self.age_all(block_id, streams)
            return BlockMode.ESTIMATE
        if not self.plan.fill or not self.caches_blocks or not self.block_cached.get(block_id, True):
            # no later step reads what this one computes, or nothing of this block is kept:
            # fora's aggressive steps need the final state only; a block over the budget computes in full
            return BlockMode.FALLBACK
        reason = unavailable() if unavailable is not None else None
        if reason is not None:
            self.stats.warn_once(f"{self.name}: {reason}")
            return BlockMode.FALLBACK
        if kind is StepKind.FULL or self.computes_in_full(block_id):
            return BlockMode.FULL
        return BlockMode.SUBSET

    def leave_block(self, uncached_flops: float, computed_flops: float, tokens: int, computed_tokens: int) -> None:
        """The block's work at this evaluation, against an uncached run's."""
        self.stats.record_block(uncached_flops, computed_flops, tokens, computed_tokens)
        if self._block is not None and self._block not in self.block_cached \
                and self.config.cache_budget_gb > 0 and self.plan.fill:
            self._fit_budget(self._block)
        self._block = None

    @property
    def caches_blocks(self) -> bool:
        """Whether blocks keep their outputs: fora's aggressive steps read the final state only."""
        return self.config.mode != "fora"

    # -- the memory budget -------------------------------------------------------
    def _fit_budget(self, block_id: int) -> None:
        """The first time a block has filled its cache: keep it if its cache,
        grown to the full forecast history for every cond, still fits the
        budget (with room for the final state); otherwise drop it, and it
        computes in full at every step. Decided from the first cond's entries
        and the cond count, so batched and split CFG decide alike. A block is
        stored before its size is known: during the first step the cache may
        hold one block more than the budget, for a moment."""
        first = self.plan.uuids[0]
        per_cond = self.store.block_bytes(first, block_id)
        if per_cond == 0:
            return   # nothing stored (the block ran as the host's own): decided when it stores
        if not self.block_cached:
            # the final state, about one block output, is always kept: aggressive steps need it
            self._budget_used = self.store.largest_feature_bytes(first, block_id) * self.conds
            self._final_reserved = self._budget_used
        projected = per_cond * self.conds
        fits = self._budget_used + projected <= self.config.cache_budget_bytes
        if fits:
            self._budget_used += projected
            self._block_bytes[block_id] = projected
        else:
            self.store.drop_block(block_id)
        self._decide_block(block_id, fits)

    def _decide_block(self, block_id: int, cached: bool) -> None:
        self.block_cached[block_id] = cached
        self.stats.blocks_cached = (sum(self.block_cached.values()), len(self.block_cached))

    def _make_room_for_final(self, parts) -> None:
        """Before the final state is first stored: its true size replaces the
        estimate reserved for it, and the last cached blocks make room if it
        is larger, so the cache never holds more than the budget."""
        rows = len(self.plan.uuids)
        final = sum(packed_bytes(part, final_precision(self.config.cache_precision)) // rows
                    for part in parts if part is not None)
        self._budget_used += final * self.store.depth * self.conds - self._final_reserved
        self._final_reserved = None
        cached = sorted(b for b, kept in self.block_cached.items() if kept)
        while self._budget_used > self.config.cache_budget_bytes and cached:
            self._drop_block(cached.pop())

    def _drop_block(self, block_id: int) -> None:
        self.store.drop_block(block_id)
        self._budget_used -= self._block_bytes.pop(block_id)
        self._decide_block(block_id, False)

    def count_conds(self, conds: int) -> None:
        """More conds than the run was made for: a host that learns the count
        only as a step's calls arrive (diffusers' separate CFG calls). What the
        budget holds is scaled to the new count and the blocks cached so far
        are decided again, in order, at their new size: those that no longer
        fit are dropped and compute in full from now on."""
        if conds <= self.conds:
            return
        scale, self.conds = conds / self.conds, conds
        if self.config.cache_budget_gb <= 0:
            return   # the cond count matters only to the budget's projection
        self._block_bytes = {block_id: size * scale for block_id, size in self._block_bytes.items()}
        if self._final_reserved is not None:
            self._final_reserved *= scale
        self._budget_used *= scale
        running = self._budget_used - sum(self._block_bytes.values())   # the final state's share
        for block_id in sorted(b for b, kept in self.block_cached.items() if kept):
            running += self._block_bytes[block_id]
            if running > self.config.cache_budget_bytes:
                running -= self._block_bytes[block_id]
                self._drop_block(block_id)

    # -- cache entries ---------------------------------------------------------------

    def put(self, block_id: int, name: str, tensor: torch.Tensor) -> None:
        """A plain entry (staleness, selector features), never estimated."""
        self.store.put(self.plan.uuids, (block_id, name), tensor)

    def get(self, block_id: int, name: str, device: torch.device) -> torch.Tensor:
        """An entry as last computed."""
        return self.store.get(self.plan.uuids, (block_id, name), device)

    def has(self, block_id: int, name: str) -> bool:
        return self.store.has(self.plan.uuids, (block_id, name))

    def cached_shape(self, block_id: int, name: str) -> torch.Size:
        """Shape of one cond's entry, without moving it."""
        return self.store.shape(self.plan.uuids[0], (block_id, name))

    def put_feature(self, block_id: int, name: str, tensor: torch.Tensor) -> None:
        """A block output computed for every token at this step; only full
        steps, where every input is exact, set the trend forecasts follow."""
        self.store.put_feature(self.plan.uuids, (block_id, name), tensor, self.time, self.plan.kind is StepKind.FULL)

    def estimate(self, block_id: int, name: str, device: torch.device) -> torch.Tensor:
        """A block output at this step's time, from what was computed before:
        reused, or forecast (config.forecast)."""
        return self._estimate((block_id, name), device)

    def estimate_tokens(self, block_id: int, name: str, index: torch.Tensor, device: torch.device) -> torch.Tensor:
        """estimate() of the tokens `index` only."""
        return self._estimate((block_id, name), device, index)

    def _estimate(self, key, device, index=None, uuids=None):
        uuids = uuids or self.plan.uuids
        if self.config.forecast_order and self.store.order_lowered(uuids[0], key):
            self.stats.warn_once(f"{self.name}: forecast {self.config.forecast}: full steps more than "
                                 f"{self.config.forecast_max_span} apart in time; a lower order is used there")
        return self.store.estimate(uuids, key, device, self.time, index)

    def scatter_feature(self, block_id: int, name: str, index: torch.Tensor, values: torch.Tensor) -> None:
        """Fresh values of the tokens `index` of a block output; measured
        against their estimate first, for the step's cache error."""
        key = (block_id, name)
        if self._measuring in self.plan.uuids and index.numel():
            chunk = values.chunk(len(self.plan.uuids))[self.plan.uuids.index(self._measuring)].float()
            estimate = self._estimate(key, chunk.device, index, [self._measuring])
            # tensors until the evaluation ends: no device sync per block
            self._error_sums[0] = self._error_sums[0] + (chunk - estimate.to(chunk.device).float()).pow(2).sum()
            self._error_sums[1] = self._error_sums[1] + chunk.pow(2).sum()
        self.store.scatter(self.plan.uuids, key, index, values, time=self.time)

    def scatter(self, block_id: int, name: str, index: torch.Tensor, values: torch.Tensor, dim: int = 1) -> None:
        """Fresh values into a plain entry."""
        self.store.scatter(self.plan.uuids, (block_id, name), index, values, dim)

    def put_final(self, *parts: Optional[torch.Tensor]) -> None:
        """The last block's output (its tensors, in order; None where it has none)."""
        self._final_parts = tuple(j for j, part in enumerate(parts) if part is not None)
        if self._final_reserved is not None and self.config.cache_budget_gb > 0:
            self._make_room_for_final(parts)
        for j in self._final_parts:
            self.store.put_feature(self.plan.uuids, (FINAL, j), parts[j], self.time, self.plan.kind is StepKind.FULL,
                                   final_precision(self.config.cache_precision))

    def has_final(self, uuids: Sequence[Hashable]) -> bool:
        return self._final_parts is not None and all(self.store.has(uuids, (FINAL, j)) for j in self._final_parts)

    def get_final(self, device: torch.device, dtype: Optional[torch.dtype] = None, part: int = 0) -> torch.Tensor:
        """Part of the last block's output, estimated at this step (aggressive steps)."""
        # a copy: blocks and ComfyUI (ControlNet) update a block's output in place
        estimate = self._estimate((FINAL, part), device)
        return estimate.to(dtype=dtype, copy=True) if dtype is not None else estimate.clone()

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

    def keep_selector_feature(self, block_id: int, x: torch.Tensor, q=None, k=None, v=None,
                              rope: Optional[Callable] = None, prefix: str = "") -> None:
        """At a full step: what the selector scores this block's tokens from
        later (selectors.kept_feature), kept under `prefix` (one per module)."""
        config = self.config
        kept = kept_feature(config.selector, x, q, k, v, config.attention_queries, config.seed, block_id, rope)
        if kept is not None:
            self.put(block_id, prefix + kept[0], kept[1])

    def selector_scores(self, block_id: int, x: torch.Tensor, prefix: str = "") -> Optional[torch.Tensor]:
        """At a conservative step: the selector's scores of the block's tokens
        [B, L] from what the full step kept; None for random."""
        selector = self.config.selector
        kept = self.get(block_id, prefix + KEPT[selector], x.device) if selector in KEPT else None
        return token_scores(selector, x, kept)

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

    def note_change(self, block_id: int, parts: Sequence[tuple], tokens: Optional[int] = None) -> None:
        """Before a full step overwrites a block's cached outputs (name, fresh)
        pairs, in token order: how much each token changed since the last
        computed step, the training-free TokenCache score; for the first
        `tokens` (the planning space) where given."""
        self.put_change(block_id, [self.token_change(block_id, name, fresh) for name, fresh in parts], tokens)

    def token_change(self, block_id: int, name: str, fresh: torch.Tensor) -> Optional[torch.Tensor]:
        """[B, L]: how much each token of `fresh` changed from the cached `name`
        (call it before the cache is overwritten); None where nothing is cached
        or no planner scores by change."""
        if self.planner is None or not self.planner.uses_changes or not self.has(block_id, name):
            return None
        return change_importance(fresh, self.get(block_id, name, fresh.device))

    def put_change(self, block_id: int, changes: Sequence[Optional[torch.Tensor]], tokens: Optional[int] = None) -> None:
        """Keep the block's changes (token_change, in token order) as its score, where every part has one."""
        if changes and all(change is not None for change in changes):
            change = torch.cat(list(changes), dim=1)
            self.put(block_id, "change", change if tokens is None else change[:, :tokens])


def staleness_key(stream: int) -> str:
    return "staleness" if stream == 0 else f"staleness{stream}"
