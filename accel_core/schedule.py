"""Which kind of step each sampling step is: full, aggressive or conservative.

Steps are identified by sigma, never by call count: samplers that evaluate the
model twice per step (heun, dpm_2), img2img with denoise < 1 and partial step
ranges all map each evaluation to its place in the run's own sigma schedule.
"""
import enum
from typing import Callable, Optional, Sequence

from .config import CacheConfig
from .tokencache import place_i_steps


class StepKind(enum.Enum):
    FULL = "full"                  # every block computes every token; the cache is refreshed
    AGGRESSIVE = "aggressive"      # no block computes; the cached final hidden state is reused
    CONSERVATIVE = "conservative"  # each block recomputes a selected subset of tokens


def step_index(sigma: float, sample_sigmas: Sequence[float]) -> int:
    """Index of the sampling step whose sigma is nearest to `sigma`.

    The last entry of a schedule is where sampling ends (usually 0) and is not a
    step of its own.
    """
    steps = max(1, len(sample_sigmas) - 1)
    best, best_distance = 0, float("inf")
    for i in range(steps):
        distance = abs(float(sample_sigmas[i]) - sigma)
        if distance < best_distance:
            best, best_distance = i, distance
    return best


class CacheSchedule:
    """Step kinds for one sampling run.

    Inside [start_sigma, end_sigma] a cycle starts with a full step every
    cycle_length steps; between full steps, DuCa alternates aggressive and
    conservative steps, ToCa uses only conservative and FORA only aggressive
    ones. Steps outside the window are full.
    """

    def __init__(self, config: CacheConfig, sample_sigmas: Sequence[float], start_sigma: float, end_sigma: float,
                 step_importance: Optional[Callable[[float], float]] = None):
        self.config = config
        self.sigmas = [float(s) for s in sample_sigmas]
        self.step_count = max(1, len(self.sigmas) - 1)
        in_window = [end_sigma <= self.sigmas[i] <= start_sigma for i in range(self.step_count)]
        if config.mode == "tokencache":
            self.kinds = self._tokencache_kinds(in_window, step_importance)
            return
        self.kinds = []
        window_start = None
        for i in range(self.step_count):
            if not in_window[i]:
                self.kinds.append(StepKind.FULL)
                window_start = None
                continue
            if window_start is None:
                window_start = i
            self.kinds.append(self._kind_in_cycle((i - window_start) % config.cycle_length))

    def _tokencache_kinds(self, in_window, step_importance):
        """TokenCache: I-steps (full) placed by cumulative importance over the
        window's steps (evenly without a calibration), P-steps (conservative)
        everywhere else in the window."""
        window = [i for i in range(self.step_count) if in_window[i]]
        kinds = [StepKind.FULL] * self.step_count
        if not window:
            return kinds
        if step_importance is None:
            importance = [1.0] * len(window)
        else:
            importance = [step_importance(self.sigmas[i]) for i in window]
        full = {window[k] for k in place_i_steps(importance, self.config.i_steps)}
        for i in window:
            kinds[i] = StepKind.FULL if i in full else StepKind.CONSERVATIVE
        return kinds

    def _kind_in_cycle(self, position: int) -> StepKind:
        if position == 0:
            return StepKind.FULL
        mode = self.config.mode
        if mode == "toca":
            return StepKind.CONSERVATIVE
        if mode == "fora":
            return StepKind.AGGRESSIVE
        aggressive_turn = (position % 2 == 1) == self.config.aggressive_first
        return StepKind.AGGRESSIVE if aggressive_turn else StepKind.CONSERVATIVE

    def step_of(self, sigma: float) -> int:
        return step_index(sigma, self.sigmas)

    def kind(self, step: int) -> StepKind:
        return self.kinds[step]

    def cache_needed_after(self, step: int) -> bool:
        """Whether a later step reuses what this step computes."""
        return step + 1 < self.step_count and self.kinds[step + 1] is not StepKind.FULL

    def counts(self) -> dict:
        return {kind.value: self.kinds.count(kind) for kind in StepKind}
