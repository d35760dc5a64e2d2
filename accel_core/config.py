"""Settings of one token-cache run, validated once, shared by every layer."""
import math
from dataclasses import dataclass

from .forecast import FORECASTS, ORDERS
from .precision import PRECISIONS

SELECTORS = ("random", "v_norm", "k_norm", "similarity", "attention")
DUCA_MODES = ("duca", "toca", "fora")   # the DuCa Cache node's modes
MODES = DUCA_MODES + ("tokencache",)
CACHE_DEVICES = ("model_device", "cpu")


@dataclass(frozen=True)
class CacheConfig:
    cache_ratio: float = 0.9        # share of tokens that REUSE the cache at a conservative step
    cycle_length: int = 5           # a full step every cycle_length steps
    selector: str = "random"
    start_percent: float = 0.0
    end_percent: float = 1.0
    seed: int = 0
    mode: str = "duca"
    staleness_weight: float = 0.25
    cache_device: str = "model_device"
    aggressive_first: bool = True   # DuCa cycle order: full, aggressive, conservative, ...
    attention_queries: int = 64     # sampled queries for the attention selector
    i_steps: int = 4                # TokenCache: steps of full compute in the window (I-steps)
    protected_last_blocks: int = 4  # TokenCache: the last K blocks always compute every token
    forecast: str = "reuse"         # how cached values stand in for fresh ones: reuse, linear, quadratic
    forecast_max_span: float = 0.3  # anchors further apart in time than this: a lower forecast order
    max_error: float = 0.0          # error-aware schedule: 0 = fixed cycles; else the measured error that forces a full step
    cache_precision: str = "model"  # how cached features are stored: model (as computed), bf16, fp8
    cache_budget_gb: float = 0.0    # the most the cache may hold (GiB); blocks beyond it compute in full; 0 = no limit

    def __post_init__(self):
        problems = []
        if not 0.0 <= self.cache_ratio <= 1.0:
            problems.append(f"cache_ratio={self.cache_ratio!r}: accepted 0.0 to 1.0 (share of tokens that reuse the cache)")
        if not isinstance(self.cycle_length, int) or isinstance(self.cycle_length, bool) or self.cycle_length < 1:
            problems.append(f"cycle_length={self.cycle_length!r}: accepted a whole number >= 1")
        if self.selector not in SELECTORS:
            problems.append(f"selector={self.selector!r}: accepted {', '.join(SELECTORS)}")
        if self.mode not in MODES:
            problems.append(f"mode={self.mode!r}: accepted {', '.join(MODES)}")
        if self.cache_device not in CACHE_DEVICES:
            problems.append(f"cache_device={self.cache_device!r}: accepted {', '.join(CACHE_DEVICES)}")
        for name in ("start_percent", "end_percent"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                problems.append(f"{name}={value!r}: accepted 0.0 to 1.0")
        if self.start_percent > self.end_percent:
            problems.append(f"start_percent={self.start_percent} is after end_percent={self.end_percent}: start must be <= end")
        if not 0.0 <= self.staleness_weight <= 10.0:
            problems.append(f"staleness_weight={self.staleness_weight!r}: accepted 0.0 to 10.0")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**64:
            problems.append(f"seed={self.seed!r}: accepted a whole number from 0 to 2**64-1")
        if self.attention_queries < 1:
            problems.append(f"attention_queries={self.attention_queries!r}: accepted a whole number >= 1")
        if not isinstance(self.i_steps, int) or self.i_steps < 1:
            problems.append(f"i_steps={self.i_steps!r}: accepted a whole number >= 1")
        if not isinstance(self.protected_last_blocks, int) or self.protected_last_blocks < 0:
            problems.append(f"protected_last_blocks={self.protected_last_blocks!r}: accepted a whole number >= 0")
        if self.forecast not in FORECASTS:
            problems.append(f"forecast={self.forecast!r}: accepted {', '.join(FORECASTS)}")
        if not (isinstance(self.forecast_max_span, (int, float)) and self.forecast_max_span > 0):
            problems.append(f"forecast_max_span={self.forecast_max_span!r}: accepted a number > 0")
        if not (isinstance(self.max_error, (int, float)) and math.isfinite(self.max_error) and self.max_error >= 0):
            problems.append(f"max_error={self.max_error!r}: accepted a number >= 0 (0 turns the error-aware schedule off)")
        elif self.max_error > 0 and self.mode not in ("duca", "toca"):
            problems.append(f"max_error={self.max_error!r} with mode={self.mode!r}: the error is measured on conservative "
                            "steps, which only modes duca and toca have; set max_error 0 or use duca/toca")
        if self.cache_precision not in PRECISIONS:
            problems.append(f"cache_precision={self.cache_precision!r}: accepted {', '.join(PRECISIONS)}")
        if not (isinstance(self.cache_budget_gb, (int, float)) and math.isfinite(self.cache_budget_gb)
                and self.cache_budget_gb >= 0):
            problems.append(f"cache_budget_gb={self.cache_budget_gb!r}: accepted a number of GiB >= 0 (0: no limit)")
        if problems:
            raise ValueError("Invalid token cache settings: " + "; ".join(problems))

    @property
    def forecast_order(self) -> int:
        return ORDERS[self.forecast]

    @property
    def caches_something(self) -> bool:
        """Whether any step can use the cache: cycle_length 1 computes every step in full."""
        return self.mode == "tokencache" or self.cycle_length > 1

    @property
    def cache_budget_bytes(self) -> float:
        return self.cache_budget_gb * 2**30 if self.cache_budget_gb > 0 else math.inf

    @property
    def max_cycle_length(self) -> int:
        """How far the error-aware schedule may stretch a cycle."""
        return 2 * self.cycle_length

    def recompute_count(self, tokens: int) -> int:
        """Tokens recomputed per block at a conservative step."""
        return min(tokens, max(0, round((1.0 - self.cache_ratio) * tokens)))
