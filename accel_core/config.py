"""Settings of one token-cache run, validated once, shared by every layer."""
from dataclasses import dataclass

SELECTORS = ("random", "v_norm", "k_norm", "similarity", "attention")
DUCA_MODES = ("duca", "toca", "fora")   # the DuCa Cache node's modes
MODES = DUCA_MODES + ("tokencache",)
CACHE_DEVICES = ("model_device", "cpu")
# conservative-step attention: "reuse" the cached output (the research method), or
# "query_subset": selected tokens recompute their queries and attend over all keys
# and values, those of unselected tokens coming from the cache
ATTENTION_VARIANTS = ("reuse", "query_subset")


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
    attention_variant: str = "reuse"
    i_steps: int = 4                # TokenCache: steps of full compute in the window (I-steps)
    protected_last_blocks: int = 4  # TokenCache: the last K blocks always compute every token

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
        if self.attention_variant not in ATTENTION_VARIANTS:
            problems.append(f"attention_variant={self.attention_variant!r}: accepted {', '.join(ATTENTION_VARIANTS)}")
        if self.attention_queries < 1:
            problems.append(f"attention_queries={self.attention_queries!r}: accepted a whole number >= 1")
        if not isinstance(self.i_steps, int) or self.i_steps < 1:
            problems.append(f"i_steps={self.i_steps!r}: accepted a whole number >= 1")
        if not isinstance(self.protected_last_blocks, int) or self.protected_last_blocks < 0:
            problems.append(f"protected_last_blocks={self.protected_last_blocks!r}: accepted a whole number >= 0")
        if problems:
            raise ValueError("Invalid token cache settings: " + "; ".join(problems))

    def recompute_count(self, tokens: int) -> int:
        """Tokens recomputed per block at a conservative step."""
        return min(tokens, max(0, round((1.0 - self.cache_ratio) * tokens)))
