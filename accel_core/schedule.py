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
        self.in_window = [end_sigma <= self.sigmas[i] <= start_sigma for i in range(self.step_count)]
        self.kinds = [StepKind.FULL] * self.step_count
        if config.mode == "tokencache":
            self.kinds = self._tokencache_kinds(self.in_window, step_importance)
        else:
            self._lay_cycles(0, None, 0)

    def _lay_cycles(self, start: int, cycle_start: Optional[int], next_full: int) -> None:
        """Kinds from `start` on: the current cycle (begun at `cycle_start`)
        runs until `next_full`, then a full step every cycle_length steps;
        outside the window every step is full and the window's first step
        begins a cycle."""
        for i in range(start, self.step_count):
            if not self.in_window[i]:
                self.kinds[i] = StepKind.FULL
                cycle_start = None
                continue
            if cycle_start is None or i >= next_full:
                cycle_start, next_full = i, i + self.config.cycle_length
            self.kinds[i] = self._kind_in_cycle(i - cycle_start)

    def last_full(self, step: int) -> int:
        return next((i for i in range(step, -1, -1) if self.kinds[i] is StepKind.FULL), 0)

    def force_full(self, step: int) -> bool:
        """Error-aware schedule: `step` becomes a full step and a new cycle
        begins there. False where it already was one."""
        if self.kinds[step] is StepKind.FULL:
            return False
        self._lay_cycles(step, None, step)
        return True

    def postpone_full(self, step: int) -> bool:
        """Error-aware schedule: the cycle that would end before `step` goes on
        through it (full step tentatively at the next one), up to
        max_cycle_length steps. False where `step` is no cycle's end inside the
        window or the cycle is at its longest."""
        if self.kinds[step] is not StepKind.FULL or step == 0 or not self.in_window[step] \
                or not self.in_window[step - 1]:
            return False
        cycle_start = self.last_full(step - 1)
        if step - cycle_start >= self.config.max_cycle_length:
            return False
        self._lay_cycles(step, cycle_start, step + 1)
        return True

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
        """Position 0 is the cycle's full step; a stretched cycle goes on past cycle_length."""
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
        """Whether a later step may use what this step computes: the next one
        (under the error-aware schedule, a full step planned next may still be
        postponed), or with forecasting any later cached step, which
        extrapolates from the last computed steps."""
        if step + 1 >= self.step_count:
            return False
        if self.config.forecast_order > 0 and any(k is not StepKind.FULL for k in self.kinds[step + 1:]):
            return True
        if self.config.max_error > 0:
            return self.in_window[step] and self.in_window[step + 1]
        return self.kinds[step + 1] is not StepKind.FULL

    def counts(self) -> dict:
        return {kind.value: self.kinds.count(kind) for kind in StepKind}
