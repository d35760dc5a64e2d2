"""Token selection for conservative steps: which tokens of a block recompute.

Every score is "higher = recompute first". Scores are reduced over the batch so
that the cond and uncond halves of a CFG batch (and every image of a batch)
recompute the same tokens.
"""
from typing import Callable, Optional, Tuple

import torch

_MASK63 = (1 << 63) - 1


def mixed_seed(seed: int, step: int, block_id: int) -> int:
    """A per-(run seed, step, block) seed, so a rerun selects the same tokens
    whether cond and uncond arrive batched or one at a time."""
    value = (seed * 0x9E3779B97F4A7C15 + (step + 1) * 0xBF58476D1CE4E5B9 + (block_id + 1) * 0x94D049BB133111EB) & _MASK63
    value ^= value >> 31
    return (value * 0xD6E8FEB86659FD93) & _MASK63


def random_scores(tokens: int, seed: int, step: int, block_id: int) -> torch.Tensor:
    generator = torch.Generator(device="cpu").manual_seed(mixed_seed(seed, step, block_id))
    return torch.rand(tokens, generator=generator)


def norm_scores(x: torch.Tensor) -> torch.Tensor:
    """Value- or key-norm score from [B, heads, L, head_dim]: tokens with the
    smallest norm (summed over heads) recompute first (DuCa's kv-norm)."""
    return -x.float().norm(dim=-1).sum(dim=1)


def similarity_scores(current: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
    """1 - cosine(current block input, block input at the last full step), [B, L]:
    the most changed tokens recompute first."""
    return 1.0 - torch.nn.functional.cosine_similarity(current.float(), cached.float(), dim=-1)


def sampled_query_indices(tokens: int, count: int, seed: int, block_id: int) -> torch.Tensor:
    generator = torch.Generator(device="cpu").manual_seed(mixed_seed(seed, -1, block_id))
    return torch.randperm(tokens, generator=generator)[:min(count, tokens)]


def attention_scores(q_sample: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Attention each token receives as a key, estimated from a sample of
    queries: softmax(q_s K^T / sqrt(d)) summed over the sampled queries and
    averaged over heads, [B, L]. Costs O(s * L * d), so the model's own
    attention keeps its fast kernel and never materialises the full map."""
    scale = q_sample.shape[-1] ** -0.5
    weights = torch.softmax((q_sample.float() @ k.float().transpose(-1, -2)) * scale, dim=-1)
    return weights.sum(dim=2).mean(dim=1)


def normalise(scores: torch.Tensor) -> torch.Tensor:
    low, high = scores.min(), scores.max()
    if high - low <= 0:
        return torch.zeros_like(scores)
    return (scores - low) / (high - low)


def pick_tokens(scores: torch.Tensor, staleness: torch.Tensor, staleness_weight: float,
                cycle_length: int, count: int) -> torch.Tensor:
    """Sorted indices of the `count` tokens to recompute.

    scores: [L] or [B, L] (averaged over the batch); staleness: steps since each
    token was last computed, [L]. The staleness bonus w * staleness / N makes
    long-reused tokens come up even when their score is low.
    """
    if scores.ndim == 2:
        scores = scores.mean(dim=0)
    total = normalise(scores.float()) + staleness_weight * staleness.to(scores.device).float() / cycle_length
    if count >= total.numel():
        return torch.arange(total.numel(), device=total.device)
    return torch.topk(total, count, sorted=False).indices.sort().values


# what a full step keeps for each selector but random: the block's input, or scores
KEPT = {"v_norm": "score", "k_norm": "score", "similarity": "input", "attention": "score"}


def kept_feature(selector: str, x: torch.Tensor, q=None, k=None, v=None, query_count: int = 64, seed: int = 0,
                 block_id: int = 0, rope: Optional[Callable] = None) -> Optional[Tuple[str, torch.Tensor]]:
    """What a full step keeps, as (name, tensor), for `selector` to score the
    block's tokens at the next conservative steps; None for random. x: the
    block's token input [B, L, D]; q, k, v: its attention [B, heads, L, d];
    rope(t, index) applies the model's rotary embedding at token positions
    `index` (None: all), where the attention estimate needs it."""
    if selector == "v_norm":
        kept = norm_scores(v)
    elif selector == "k_norm":
        kept = norm_scores(k)
    elif selector == "similarity":
        kept = x
    elif selector == "attention":
        sample = sampled_query_indices(q.shape[2], query_count, seed, block_id).to(q.device)
        q_sample = q[:, :, sample]
        if rope is not None:
            q_sample, k = rope(q_sample, sample), rope(k, None)
        kept = attention_scores(q_sample, k)
    else:
        return None
    return KEPT[selector], kept


def token_scores(selector: str, x: torch.Tensor, kept: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Scores [B, L] ("higher = recompute first") at a conservative step from
    what the full step kept (kept_feature); None for random."""
    if selector == "random":
        return None
    if selector == "similarity":
        return similarity_scores(x, kept)
    return kept
