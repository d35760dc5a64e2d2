"""A run's cache size projected before the run, from the model's layout and
the token counts alone: ComfyUI's model loading keeps this much free
(nodes/patcher.py), so a first run of a new size does not run out of memory
mid-sampling. It follows what the engines store per cond once a full step
has filled the cache:

- per block, its cached features (attention and MLP outputs, per stream),
  each `width` values per token in the cache precision, one copy per
  forecast term; an int32 staleness counter per token of each stream; what
  the selector keeps to score tokens later (similarity: the module input as
  computed; a score per token otherwise); TokenCache's training-free scoring
  keeps a change score per planned token;
- the last block's output, which aggressive steps estimate (mode fora keeps
  only this), at least bf16 (precision.final_precision).

A memory budget is not projected: where one is set, it is what is reserved."""
from dataclasses import dataclass

from .config import CacheConfig
from .precision import final_precision, stored_bytes

COUNTER_BYTES = 4   # int32 staleness counter per token
SCORE_BYTES = 4     # float32 score per token (selector scores, TokenCache's change)


@dataclass(frozen=True)
class BlockCache:
    """What one block stores for one cond, as token counts."""
    features: tuple                 # tokens of each cached feature
    counters: tuple                 # tokens of each staleness counter (one per stream)
    selector_inputs: tuple = ()     # tokens of each input a selector scores from (one per token-wise module)
    planned: int = 0                # tokens TokenCache plans in (its change score)


@dataclass(frozen=True)
class CacheLayout:
    """A model's cache for one cond at one latent size and text length."""
    width: int             # values per token of every feature
    dtype_bytes: int       # bytes per value as the model computes
    blocks: tuple          # BlockCache per block
    final: tuple           # tokens of each part of the last block's output


def projected_cache_bytes(layout: CacheLayout, config: CacheConfig, tokencache_change: bool = False,
                          rows: int = 1) -> int:
    """Peak cache bytes of one cond of `rows` latents under `config` (no
    budget): every stored value is per row but the staleness counters, which
    the rows share (one selection for all)."""
    copies = 1 + config.forecast_order

    def features(tokens, precision):
        return copies * sum(stored_bytes(t, layout.width, layout.dtype_bytes, precision) for t in tokens)

    final = features(layout.final, final_precision(config.cache_precision))
    if config.mode == "fora":
        return rows * final
    per_row, counters = final, 0
    for block in layout.blocks:
        per_row += features(block.features, config.cache_precision)
        counters += COUNTER_BYTES * sum(block.counters)
        if config.selector == "similarity":
            per_row += sum(block.selector_inputs) * layout.width * layout.dtype_bytes
        elif config.selector != "random":
            per_row += SCORE_BYTES * sum(block.selector_inputs)
        if tokencache_change:
            per_row += SCORE_BYTES * block.planned
    return rows * per_row + counters
