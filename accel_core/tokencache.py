"""TokenCache (arXiv 2409.18523): a learned predictor of which (block, token)
pairs must recompute, its training objective, the block-level token allocation
and the I-step placement (Two-Phase Round-Robin).

Vocabulary: a score a = 1 means "recompute this token in this block", a = 0
"reuse its cached block output from the previous computed step". The paper
gives no public code. Two predictors: the paper's, a copy of the model's first
block with a scoring head (FirstBlockPredictor; the family adapter says how
to run the block), and a small MLP-mixer (CachePredictor) that needs nothing
from the model and costs almost nothing to run.
"""
import dataclasses
import math
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
import torch.func
from torch import nn

from .selectors import random_scores


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """DiT-style sinusoidal embedding of t [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def _undecided_head(width: int, n_blocks: int) -> nn.Linear:
    """The scoring head: sigmoid(0) = 0.5 and small weights, so training starts
    undecided between reuse and recompute instead of saturated on one side."""
    head = nn.Linear(width, n_blocks)
    nn.init.zeros_(head.bias)
    with torch.no_grad():
        head.weight.mul_(0.1)
    return head


class CachePredictor(nn.Module):
    """Scores in [0, 1] for every (block, token): how much the token needs recomputing.

    Input: the hidden tokens entering the first transformer block, x [B, L, D],
    and the sigma or timestep t [B]; output [B, n_blocks, L].
    t is multiplied by `time_scale` before the sinusoidal embedding: 1000 suits
    sigmas in [0, 1] (flow models), 1 suits timesteps in [0, 1000].
    No positional embedding and only a mean-token mix, so one predictor serves
    any token count (resolution).
    """

    def __init__(self, hidden_size: int, n_blocks: int, width: int = 64, time_scale: float = 1000.0):
        super().__init__()
        if hidden_size < 1 or n_blocks < 1 or width < 2:
            raise ValueError(f"CachePredictor(hidden_size={hidden_size}, n_blocks={n_blocks}, width={width}): "
                             "expected hidden_size >= 1, n_blocks >= 1, width >= 2")
        self.hidden_size = hidden_size
        self.n_blocks = n_blocks
        self.width = width
        self.time_scale = float(time_scale)
        self.in_norm = nn.LayerNorm(hidden_size)
        self.in_proj = nn.Linear(hidden_size, width)
        self.time_mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.token_norm = nn.LayerNorm(width)
        self.token_mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.mix_norm = nn.LayerNorm(width)
        self.mix_self = nn.Linear(width, width)
        self.mix_mean = nn.Linear(width, width, bias=False)
        self.head_norm = nn.LayerNorm(width)
        self.head = _undecided_head(width, n_blocks)

    architecture = "mlp_mixer"

    def config(self) -> dict:
        return {"hidden_size": self.hidden_size, "n_blocks": self.n_blocks, "width": self.width,
                "time_scale": self.time_scale}

    def flops(self, tokens: int) -> float:
        """Per batch row: two FLOPs per weight of the per-token linear layers."""
        per_token = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear)) \
            - sum(m.weight.numel() for m in self.time_mlp.modules() if isinstance(m, nn.Linear))
        return 2.0 * per_token * tokens

    def score(self, inputs: "PlanningInput", t: torch.Tensor) -> torch.Tensor:
        return self(inputs.tokens, t)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"CachePredictor expects tokens [B, L, {self.hidden_size}], got {tuple(x.shape)}")
        dtype = self.in_proj.weight.dtype
        t = t.reshape(-1).to(x.device)
        if t.numel() == 1:
            t = t.expand(x.shape[0])   # one sigma for the whole batch
        h = self.in_proj(self.in_norm(x.to(dtype)))
        temb = timestep_embedding(t * self.time_scale, self.width).to(dtype)
        h = h + self.time_mlp(temb)[:, None, :]
        h = h + self.token_mlp(self.token_norm(h))
        n = self.mix_norm(h)
        h = h + self.mix_self(n) + self.mix_mean(n.mean(dim=1, keepdim=True))
        return torch.sigmoid(self.head(self.head_norm(h))).transpose(1, 2)


def map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """`value` with fn applied to every tensor in it, through tuples, lists,
    dicts and dataclasses (a block's modulation); anything else as it is."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: map_tensors(getattr(value, f.name), fn)
                                             for f in dataclasses.fields(value) if f.init})
    return value


def take_rows(value: Any, rows: int, batch: int) -> Any:
    """`value` with every tensor whose first dimension is the batch cut to its first `rows` rows."""
    return map_tensors(value, lambda t: t[:rows] if t.ndim and t.shape[0] == batch else t)


def map_block_args(args: dict, fn: Callable[[torch.Tensor], torch.Tensor]) -> dict:
    """map_tensors over a block's inputs, leaving transformer_options (run
    settings the block reads, not per-row data) as they are."""
    return {k: v if k == "transformer_options" else map_tensors(v, fn) for k, v in args.items()}


def copy_each_once() -> Callable[[torch.Tensor], torch.Tensor]:
    """A copier for recorded tensors: copies made outside inference mode can be
    used by autograd, and a tensor shared by several blocks (positions,
    modulation) is copied once."""
    copies = {}
    return lambda t: copies[id(t)] if id(t) in copies else copies.setdefault(id(t), t.clone())


def call_for_autograd(module: nn.Module, *args, **kwargs):
    """module(*args, **kwargs) where autograd can reach the inputs: ComfyUI
    loads weights in inference mode, and autograd cannot keep those for the
    backward pass, so the call sees copies of them (made again when a
    checkpointed backward pass recomputes the call)."""
    copies = {name: p.clone() for name, p in module.named_parameters() if p.is_inference()}
    return torch.func.functional_call(module, copies, args, kwargs)


def training_step(optimizer: torch.optim.Optimizer, parameters, grads) -> None:
    """One optimiser step with gradients computed by torch.autograd.grad (None: unused)."""
    for parameter, grad in zip(parameters, grads):
        parameter.grad = grad
    optimizer.step()


def loss_windows(losses: Sequence[float], window: int = 20) -> dict:
    """Mean loss of the first and of the last `window` iterations."""
    window = max(1, min(window, len(losses)))
    return {"first_loss": sum(losses[:window]) / window, "final_loss": sum(losses[-window:]) / window}


@dataclasses.dataclass
class PlanningInput:
    """What a predictor sees at one step: the tokens entering the first block
    [B, L, D] and, for FirstBlockPredictor, that block's own inputs in the
    family's format (modulation vector, positions, ...)."""
    tokens: torch.Tensor
    block_args: Optional[dict] = None

    def rows(self, count: int) -> "PlanningInput":
        batch = self.tokens.shape[0]
        return self.map(lambda t: take_rows(t, count, batch))

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "PlanningInput":
        """fn applied to the tokens and every tensor of the block's inputs."""
        args = None if self.block_args is None else map_block_args(self.block_args, fn)
        return PlanningInput(fn(self.tokens), args)


class FirstBlockPredictor(nn.Module):
    """The paper's predictor: a copy of the model's first transformer block
    (same shape, initialised from its weights) and a linear scoring head, so it
    reads the tokens with the model's own attention and timestep modulation.

    `runner(block, inputs)` runs the block on a PlanningInput and returns its
    output tokens [B, L, D] (None where the block cannot run those inputs);
    `runner.flops(block, tokens)` is its work per batch row. Both come from the
    family adapter, which alone knows how its blocks are called.
    """
    architecture = "first_block"

    def __init__(self, block: nn.Module, runner, hidden_size: int, n_blocks: int, block_kind: str):
        super().__init__()
        if hidden_size < 1 or n_blocks < 1:
            raise ValueError(f"FirstBlockPredictor(hidden_size={hidden_size}, n_blocks={n_blocks}): expected both >= 1")
        self.hidden_size = hidden_size
        self.n_blocks = n_blocks
        self.block_kind = block_kind
        self.runner = runner
        self.block = block
        self.head_norm = nn.LayerNorm(hidden_size)
        self.head = _undecided_head(hidden_size, n_blocks)

    def config(self) -> dict:
        """Constructor arguments besides the block and its runner."""
        return {"hidden_size": self.hidden_size, "n_blocks": self.n_blocks, "block_kind": self.block_kind}

    def flops(self, tokens: int) -> float:
        return self.runner.flops(self.block, tokens) + 2.0 * self.head.weight.numel() * tokens

    def score(self, inputs: PlanningInput, t: torch.Tensor = None) -> Optional[torch.Tensor]:
        return self(inputs, t)

    def forward(self, inputs: PlanningInput, t: torch.Tensor = None) -> Optional[torch.Tensor]:
        """[B, n_blocks, L]; the timestep reaches the block through its own modulation inputs."""
        dtype = self.head.weight.dtype
        tokens = self.runner(self.block, inputs)
        if tokens is None:
            return None
        return torch.sigmoid(self.head(self.head_norm(tokens.to(dtype)))).transpose(1, 2)


def soft_reuse_loss(scores: torch.Tensor, fresh: torch.Tensor, cached: torch.Tensor,
                    cost_weight: float) -> Tuple[torch.Tensor, dict]:
    """TokenCache objective with teacher-forced block outputs.

    scores a [B, n_blocks, L] (1 = recompute); fresh / cached [B, n_blocks, L, D]:
    each block's residual contribution f_l(x) at this step, and the one reused
    from the previous computed step. The soft run adds a * fresh + (1 - a) * cached
    in every block, so x_L(soft) - x_L(full) = sum_l (1 - a_l) (cached_l - fresh_l).
    First-order: every block sees the full run's input (teacher forcing), so an
    error made in one block is not propagated through the later blocks.

    error = mean ||x_L(soft) - x_L(full)||^2 / mean ||sum_l fresh_l||^2 (the
    normalisation makes cost_weight independent of the model's feature scale);
    cost = mean(a). Returns (error + cost_weight * cost, {"error", "cost"} detached).
    """
    if scores.ndim != 3 or fresh.shape != cached.shape or fresh.shape[:3] != scores.shape:
        raise ValueError(f"soft_reuse_loss: expected scores [B, n_blocks, L] and fresh/cached [B, n_blocks, L, D] "
                         f"with matching leading sizes, got {tuple(scores.shape)}, {tuple(fresh.shape)}, "
                         f"{tuple(cached.shape)}")
    delta = cached - fresh
    # einsum in the features' dtype: a float copy of [B, n_blocks, L, D] would
    # double training memory on large models; the sum over blocks accumulates in fp32
    difference = torch.einsum("bnl,bnld->bld", (1.0 - scores).to(delta.dtype), delta).float()
    with torch.no_grad():
        scale = fresh.sum(dim=1).float().pow(2).sum(dim=-1).mean().clamp_min(1e-12)
    error = difference.pow(2).sum(dim=-1).mean() / scale
    cost = scores.float().mean()
    return error + cost_weight * cost, {"error": error.detach(), "cost": cost.detach()}


def soft_run_loss(scores: torch.Tensor, start: torch.Tensor,
                  step_block: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor], target: torch.Tensor,
                  cost_weight: float, scale: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, dict]:
    """The TokenCache objective through the blocks: x_l = x_{l-1} + g_l(x_{l-1}, a_l),
    where step_block(l, x, a_l) -> g_l [B, L, D] is block l's contribution
    when each token is recomputed to the degree a_l [B, L] (1 = recompute),
    so an error a reused token makes in one block reaches every later block
    the way it does at inference.

    scores a [B, n_blocks, L]; start x_0 [B, L, D] entering the first block;
    target x_L(full) [B, L, D]. error = ||x_L(soft) - x_L(full)||^2 normalised
    by the full run's total contribution ||x_L(full) - x_0||^2 unless `scale`
    is given; cost = mean(a). Returns (error + cost_weight * cost, {"error", "cost"} detached).
    """
    if scores.ndim != 3 or start.shape != target.shape or scores.shape[0] != start.shape[0] \
            or scores.shape[2] != start.shape[1]:
        raise ValueError(f"soft_run_loss: expected scores [B, n_blocks, L] and start/target [B, L, D], got "
                         f"{tuple(scores.shape)}, {tuple(start.shape)}, {tuple(target.shape)}")
    x = start.float()
    for block_id in range(scores.shape[1]):
        x = x + step_block(block_id, x, scores[:, block_id].float()).float()
    target = target.float()
    if scale is None:
        with torch.no_grad():
            scale = (target - start.float()).pow(2).sum(dim=-1).mean().clamp_min(1e-12)
    error = (x - target).pow(2).sum(dim=-1).mean() / scale
    cost = scores.float().mean()
    return error + cost_weight * cost, {"error": error.detach(), "cost": cost.detach()}


def chained_reuse_loss(scores: torch.Tensor, start: torch.Tensor, run_block: Callable[[int, torch.Tensor], torch.Tensor],
                       cached: torch.Tensor, target: torch.Tensor, cost_weight: float,
                       scale: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, dict]:
    """TokenCache objective through the blocks, as the paper states it:
    x_l = x_{l-1} + a_l * f_l(x_{l-1}) + (1 - a_l) * cached_l, where f_l runs on the
    soft state (soft_run_loss): a recomputed token recomputes the whole block.

    run_block(l, x) -> f_l(x) [B, L, D] (the frozen model's block l, its
    residual contribution); cached [B, n_blocks, L, D] the contributions
    reused from the previous computed step.
    """
    if scores.ndim != 3 or cached.shape[:3] != scores.shape or cached.shape[0] != start.shape[0] \
            or cached.shape[2:] != start.shape[1:]:
        raise ValueError(f"chained_reuse_loss: expected scores [B, n_blocks, L], start/target [B, L, D] and cached "
                         f"[B, n_blocks, L, D], got {tuple(scores.shape)}, {tuple(start.shape)}, "
                         f"{tuple(target.shape)}, {tuple(cached.shape)}")

    def step_block(block_id, x, a):
        a = a[..., None]
        return a * run_block(block_id, x).float() + (1.0 - a) * cached[:, block_id].float()
    return soft_run_loss(scores, start, step_block, target, cost_weight, scale)


def allocate_tokens(scores: torch.Tensor, cache_ratio: float,
                    protected_last_blocks: int) -> Tuple[List[torch.Tensor], List[float]]:
    """Block-level allocation under one global cache ratio.

    scores [n_blocks, L] (already averaged over the batch). Over the cacheable
    blocks (all but the last K), the round((1 - r) * L * n_cacheable) highest
    scores are marked "update"; a block's indices are its marked tokens, sorted.
    The last K blocks recompute every token. Equal scores go to the earlier
    block, then the earlier token, so the allocation is reproducible.

    Returns (indices per block, share of each block's tokens recomputed).
    """
    if scores.ndim != 2:
        raise ValueError(f"allocate_tokens expects scores [n_blocks, L], got {tuple(scores.shape)}")
    if not 0.0 <= cache_ratio <= 1.0:
        raise ValueError(f"cache_ratio={cache_ratio!r}: accepted 0.0 to 1.0 (share of tokens that reuse the cache)")
    if protected_last_blocks < 0:
        raise ValueError(f"protected_last_blocks={protected_last_blocks!r}: accepted a whole number >= 0")
    n_blocks, tokens = scores.shape
    cacheable = max(0, n_blocks - protected_last_blocks)
    budget = round((1.0 - cache_ratio) * tokens * cacheable)
    marked = torch.zeros(cacheable * tokens, dtype=torch.bool, device=scores.device)
    if budget:
        order = torch.sort(scores[:cacheable].reshape(-1).float(), descending=True, stable=True).indices
        marked[order[:budget]] = True
    marked = marked.reshape(cacheable, tokens)
    indices = [marked[b].nonzero().flatten() for b in range(cacheable)]
    indices += [torch.arange(tokens, device=scores.device) for _ in range(cacheable, n_blocks)]
    return indices, [len(index) / tokens if tokens else 1.0 for index in indices]


def place_i_steps(importance: Sequence[float], count: int) -> List[int]:
    """Steps that run full compute (I-steps), Two-Phase Round-Robin phase 2.

    importance [S] (>= 0, per sampling step, measured in the calibration phase,
    e.g. mean predicted score). Step 0 is always an I-step; the k-th other one
    is the first step where the importance accumulated before it reaches
    k / count of the total, so I-steps crowd where importance is high. Indices
    are made distinct by pushing a collision to the next free step. count is
    clipped to [1, S]; all-zero importance counts as uniform.
    """
    values = torch.as_tensor(importance, dtype=torch.float64).flatten()
    steps = values.numel()
    if steps == 0:
        raise ValueError("place_i_steps: importance is empty, expected one value per sampling step")
    if not torch.isfinite(values).all() or (values < 0).any():
        raise ValueError("place_i_steps: importance must be finite and >= 0 for every step")
    count = min(max(int(count), 1), steps)
    if values.sum() <= 0:
        values = torch.ones_like(values)
    before = torch.cat([values.new_zeros(1), values.cumsum(0)[:-1]]) / values.sum()
    chosen = [0]
    for k in range(1, count):
        # the tolerance keeps k / count from being missed by a rounding error in the cumsum
        crossed = (before >= k / count - 1e-9).nonzero()
        candidate = int(crossed[0]) if len(crossed) else steps - 1
        # distinct, and leave room for the I-steps still to place
        chosen.append(min(max(candidate, chosen[-1] + 1), steps - count + k))
    return chosen


def change_importance(current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Training-free score [B, L]: relative L2 change of each token's block
    output between the last two computed steps, ||current - previous|| / ||previous||."""
    if current.shape != previous.shape or current.ndim != 3:
        raise ValueError(f"change_importance expects two [B, L, D] tensors of one shape, got "
                         f"{tuple(current.shape)} and {tuple(previous.shape)}")
    previous = previous.float()
    return (current.float() - previous).norm(dim=-1) / previous.norm(dim=-1).clamp_min(1e-6)


def importance_curve(calibration: dict) -> Callable[[float], float]:
    """Predicted importance as a function of sigma, from a calibration
    {"sigmas": [...], "importance": [...]}: linear between the measured sigmas,
    so I-steps can be placed for any step count or scheduler of the same model."""
    sigmas = torch.tensor(calibration["sigmas"], dtype=torch.float64)
    values = torch.tensor(calibration["importance"], dtype=torch.float64)
    order = torch.argsort(sigmas)
    sigmas, values = sigmas[order], values[order]

    def at(sigma: float) -> float:
        if sigma <= sigmas[0]:
            return float(values[0])
        if sigma >= sigmas[-1]:
            return float(values[-1])
        right = int(torch.searchsorted(sigmas, torch.tensor([sigma], dtype=torch.float64))[0])
        left = right - 1
        weight = (sigma - sigmas[left]) / (sigmas[right] - sigmas[left])
        return float(values[left] + weight * (values[right] - values[left]))
    return at


STALENESS_WEIGHT = 2.0   # measured on the reference model (BENCHMARKS.md, issue 12): tokens rotate


class TokenPlanner:
    """Which tokens every block recomputes at a TokenCache P-step: the top
    priorities over all cacheable blocks (block-level allocation), scored by
    the learned predictor from the first block's input, or without one by how
    much each token's block output changed between the last two computed
    steps (random until two steps were computed). fallback="random" scores at
    random, the baseline both are measured against.

    Priority = the score's rank within its block (0 to 1) + staleness_weight x
    the P-steps since the token was last recomputed in that block (0 after an
    I-step), so the same tokens are not picked at every P-step: one planner
    per sampling run, its staleness per token layout."""

    def __init__(self, n_blocks: int, cache_ratio: float, protected_last_blocks: int,
                 predictor: Optional[nn.Module] = None, seed: int = 0, fallback: str = "change",
                 staleness_weight: float = STALENESS_WEIGHT):
        if predictor is not None and predictor.n_blocks != n_blocks:
            raise ValueError(f"the predictor scores {predictor.n_blocks} blocks, the model has {n_blocks}")
        if fallback not in ("change", "random"):
            raise ValueError(f"fallback={fallback!r}: accepted change, random")
        self.n_blocks = n_blocks
        self.cache_ratio = cache_ratio
        self.protected_last_blocks = protected_last_blocks
        self.predictor = predictor
        self.seed = seed
        self.fallback = fallback
        self.staleness_weight = staleness_weight
        self._staleness = {}   # token count -> (step of the last plan, [n_blocks, L] P-steps since recomputed)

    @property
    def uses_changes(self) -> bool:
        return self.predictor is None and self.fallback == "change"

    def protected(self, block_id: int) -> bool:
        return block_id >= self.n_blocks - self.protected_last_blocks

    def predicted(self, inputs: PlanningInput, sigma: float) -> Optional[torch.Tensor]:
        """The predictor's scores [n_blocks, L] (mean over the rows of `inputs`),
        run on the device of the tokens in the predictor's own dtype; None
        without a predictor or where it cannot read these inputs."""
        if self.predictor is None:
            return None
        tokens = inputs.tokens
        predictor = self.predictor.to(tokens.device)
        with torch.no_grad():
            scores = predictor.score(inputs, torch.tensor([sigma], device=tokens.device))
        return None if scores is None else scores.float().mean(dim=0)

    def scores(self, inputs: PlanningInput, sigma: float, changes: Sequence[Optional[torch.Tensor]],
               step: int) -> torch.Tensor:
        """[n_blocks, L]: from the predictor, else from the changes per block
        ([B, L] or None), else random."""
        predicted = self.predicted(inputs, sigma)
        if predicted is not None:
            return predicted
        tokens, device = inputs.tokens.shape[1], inputs.tokens.device
        rows = [change.float().mean(dim=0) if change is not None and self.uses_changes
                else random_scores(tokens, self.seed, step, block_id).to(device)
                for block_id, change in enumerate(changes)]
        return torch.stack(rows)

    def plan(self, inputs: PlanningInput, sigma, changes, step) -> List[torch.Tensor]:
        scores = self.scores(inputs, sigma, changes, step)
        if not self.staleness_weight:
            return allocate_tokens(scores, self.cache_ratio, self.protected_last_blocks)[0]
        tokens = scores.shape[1]
        last_step, staleness = self._staleness.get(tokens, (None, None))
        if last_step != step - 1:    # a full step came between: every token was recomputed
            staleness = torch.zeros_like(scores)
        rank = scores.float().argsort(dim=1, stable=True).argsort(dim=1).float() / max(1, tokens - 1)
        indices = allocate_tokens(rank + self.staleness_weight * staleness.to(rank.device), self.cache_ratio,
                                  self.protected_last_blocks)[0]
        staleness = staleness + 1
        for block_id, index in enumerate(indices):
            staleness[block_id, index] = 0
        self._staleness[tokens] = (step, staleness)
        return indices
