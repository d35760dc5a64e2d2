"""Work accounting of one sampling run: what was computed, against what an
uncached run computes, and the speedup that implies."""
import logging
from dataclasses import dataclass, field

from .schedule import StepKind


@dataclass
class WorkStats:
    step_kinds: dict = field(default_factory=dict)   # step index -> StepKind actually run
    evaluations: int = 0                             # model calls (split CFG and heun make several per step)
    flops_computed: float = 0.0
    flops_uncached: float = 0.0
    predictor_flops: float = 0.0                     # TokenCache's learned predictor, part of flops_computed
    adapter_flops: float = 0.0                       # TokenCache's LoRA adapters, part of flops_computed
    token_blocks_computed: int = 0
    token_blocks_total: int = 0
    peak_cache_bytes: int = 0
    notes: list = field(default_factory=list)        # one-time messages (fallbacks)
    warnings: list = field(default_factory=list)     # ... those the user must see on the node
    step_errors: dict = field(default_factory=dict)  # step -> measured relative cache error (conservative steps)
    full_steps_added: int = 0                        # error-aware schedule: full steps the measured error forced
    full_steps_saved: int = 0                        # ... and cycle ends it postponed
    blocks_cached: tuple = ()                        # under a memory budget: (blocks cached, blocks decided)

    def record_step(self, step: int, kind: StepKind) -> None:
        # Several evaluations can share a step (split CFG, heun): a step that ran
        # full in any of them counts as full.
        if self.step_kinds.get(step) is not StepKind.FULL:
            self.step_kinds[step] = kind

    def record_block(self, uncached_flops: float, computed_flops: float, tokens: int, computed_tokens: int) -> None:
        self.flops_uncached += uncached_flops
        self.flops_computed += computed_flops
        self.token_blocks_total += tokens
        self.token_blocks_computed += computed_tokens

    def record_predictor(self, flops: float) -> None:
        """Work spent choosing tokens: computed, with no uncached counterpart."""
        self.flops_computed += flops
        self.predictor_flops += flops

    def record_adapters(self, flops: float) -> None:
        """Work of the LoRA refinement adapters: computed, with no uncached counterpart."""
        self.flops_computed += flops
        self.adapter_flops += flops

    def record_error(self, step: int, error: float) -> None:
        self.step_errors[step] = error

    def note_once(self, message: str) -> bool:
        if message in self.notes:
            return False
        self.notes.append(message)
        return True

    def warn_once(self, message: str) -> None:
        """A fallback users should hear about: noted, and logged the first time."""
        if self.note_once(message):
            self.warnings.append(message)
            logging.warning(message)

    def counts(self) -> dict:
        values = list(self.step_kinds.values())
        return {kind.value: values.count(kind) for kind in StepKind}

    @property
    def work_fraction(self) -> float:
        """Share of the uncached run's transformer-block FLOPs actually computed."""
        return self.flops_computed / self.flops_uncached if self.flops_uncached else 1.0

    @property
    def token_fraction(self) -> float:
        return self.token_blocks_computed / self.token_blocks_total if self.token_blocks_total else 1.0

    @property
    def theoretical_speedup(self) -> float:
        return 1.0 / self.work_fraction if self.work_fraction > 0 else float("inf")

    def headline(self, name: str) -> str:
        """The short form, for the node's text box: the speedup first, then
        what earned it, then every warning of the run."""
        c = self.counts()
        kinds = ", ".join(f"{c[kind.value]} {kind.value}" for kind in StepKind
                          if c[kind.value] or kind is StepKind.FULL)
        mib = self.peak_cache_bytes / 2**20
        cache = f"{mib:.0f}" if mib >= 10 else f"{mib:.1f}"
        line = f"{name} {self.theoretical_speedup:.2f}x work ({len(self.step_kinds)} steps: {kinds}), cache {cache} MiB"
        if self.blocks_cached:
            line += f", {self.blocks_cached[0]}/{self.blocks_cached[1]} blocks cached"
        return "\n".join([line, *self.warnings])

    def summary(self, name: str) -> str:
        c = self.counts()
        predictor = ""
        if self.predictor_flops and self.flops_uncached:
            predictor = f", predictor {100 * self.predictor_flops / self.flops_uncached:.1f}%"
        if self.adapter_flops and self.flops_uncached:
            predictor += f", LoRA {100 * self.adapter_flops / self.flops_uncached:.2f}%"
        errors = ""
        if self.step_errors:
            values = list(self.step_errors.values())
            errors = f", measured error mean {sum(values) / len(values):.3f} max {max(values):.3f}"
        if self.full_steps_added or self.full_steps_saved:
            errors += f", full steps +{self.full_steps_added}/-{self.full_steps_saved} by error"
        if self.blocks_cached:
            errors += (f", {self.blocks_cached[0]} of {self.blocks_cached[1]} blocks cached within the budget "
                       "(the others compute in full)")
        return (f"{name}: {len(self.step_kinds)} steps ({c['full']} full, {c['aggressive']} aggressive, "
                f"{c['conservative']} conservative), computed {100 * self.work_fraction:.1f}% of block work"
                f"{predictor} (theoretical {self.theoretical_speedup:.2f}x), "
                f"cache peak {self.peak_cache_bytes / 2**20:.1f} MiB{errors}")
