"""Training a TokenCache predictor on the user's own model, prompts and sampler.

The diffusion model stays frozen: the family adapter's block wrappers on a
clone record, at every model evaluation of a real ComfyUI sampling run, the
first block's inputs and every block's residual contribution
f_l(x) = block(x) - x in TokenCache's planning space (the adapter's
token_layout: cat(txt, img) for the Flux family, the image/video tokens for
the others).
Consecutive evaluations of the same conds give (current, previous) pairs.

Two objectives (accel_core.tokencache):
- "chained", the paper's: the soft mix of fresh and reused contributions runs
  through the model's own blocks, so errors propagate as they do at inference.
  Each evaluation keeps every token's contributions (blocks x tokens x hidden
  per row, in the model's dtype, on the CPU) and the backward pass goes
  through every block.
- "p_step": as "chained", but each block runs as TokenCache's P-step runs it:
  attention reused from the last computed step, only the token-wise branch
  (MLP, cross-attention queries) recomputed to the degree a, its cached
  output reused otherwise; the protected last blocks recompute in full. It
  also keeps every block's branch outputs (about twice "chained"'s memory).
- "first_order": each block sees the full run's input; contributions are kept
  for a fixed random subset of tokens only, so memory stays bounded on large
  models.
Two predictors: "first_block", a copy of the model's first block with a
scoring head (the paper's), and "mlp_mixer", small and family-free.
Each trajectory uses a new noise seed.
"""
import contextlib
import functools
import logging
from dataclasses import dataclass, field

import torch

import comfy.model_management
import comfy.patcher_extension

from ..accel_core.tokencache import (CachePredictor, FirstBlockPredictor, PlanningInput, chained_reuse_loss,
                                     copy_each_once, loss_windows, map_block_args, map_tensors, soft_reuse_loss,
                                     soft_run_loss, training_step)
from .families import adapter_for
from .lora_training import sample_for_training, train_lora
from .patcher import transformer_options_of

ARCHITECTURES = ("first_block", "mlp_mixer")
OBJECTIVES = ("chained", "p_step", "first_order")
THROUGH_BLOCKS = ("chained", "p_step")   # objectives that run the model's blocks (every token recorded)
BLOCK_LR_SCALE = 0.1   # the copied block starts from trained weights: it moves slower than the new head


@dataclass
class TrainingSettings:
    seed: int = 0
    steps: int = 20
    cfg: float = 4.0
    sampler_name: str = "euler"
    scheduler: str = "simple"
    iterations: int = 200
    learning_rate: float = 1e-3
    cost_weight: float = 0.05
    architecture: str = "first_block"
    objective: str = "chained"
    max_tokens: int = 1024     # first_order: tokens whose block deltas are recorded per trajectory
    width: int = 64            # mlp_mixer width
    lora_rank: int = 0         # LoRA refinement of the protected last blocks (0: none)
    # the TokenCache setting the LoRA is trained under: the TokenCache node's values
    cache_ratio: float = 0.9
    i_steps: int = 4
    protected_last_blocks: int = 4

    @property
    def lora_iterations(self) -> int:
        return self.iterations

    def check(self):
        for name, accepted in (("architecture", ARCHITECTURES), ("objective", OBJECTIVES)):
            if getattr(self, name) not in accepted:
                raise ValueError(f"TokenCache training: {name}={getattr(self, name)!r}; accepted: {', '.join(accepted)}")
        if self.lora_rank < 0:
            raise ValueError(f"TokenCache training: lora_rank={self.lora_rank!r}; accepted 0 (no LoRA) or more")


@dataclass
class Evaluation:
    conds: tuple               # uuids of the conds in the batch
    sigma: float
    inputs: PlanningInput      # tokens entering the first block (CPU) and its inputs
    deltas: torch.Tensor       # [B, n_blocks, S, D] at the recorded tokens (all of them for "chained"), CPU
    block_args: list           # "chained", "p_step": each block's inputs besides the tokens
    branches: list = field(default_factory=list)   # "p_step": each block's branch outputs a P-step reuses


class _Recorder:
    """Block wrappers (the family adapter's) and an APPLY_MODEL wrapper that
    record one sampling run's evaluations. `subset_size` None keeps every token."""

    def __init__(self, adapter, subset_size, generator: torch.Generator, on_first=None, branches=False):
        self.adapter = adapter
        self.keep_branches = branches
        self.on_first = on_first   # called with the first evaluation recorded (the memory check)
        self.subset_size = subset_size
        self.generator = generator
        self.subset = None
        self.evaluations = []
        self._sigma = None
        self._inputs = None
        self._count = None         # tokens in the planning space at this evaluation
        self._deltas = []
        self._block_args = []
        self._branches = []

    def take(self) -> list:
        """The evaluations, and nothing of them kept here: the clone's patches and
        the recorder refer to each other, a cycle the garbage collector frees
        late, and a trajectory's block outputs must go when training drops them."""
        evaluations, self.evaluations = self.evaluations, []
        self._inputs, self._deltas, self._block_args, self._branches = None, [], [], []
        return evaluations

    def install(self, model_patcher):
        for block_id in range(self.adapter.block_count):
            self.adapter.wrap_block(model_patcher, block_id, functools.partial(self._block, block_id))
        model_patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "dit_token_cache_recorder",
                                           self._evaluation)

    def _evaluation(self, executor, x, t, *args, **kwargs):
        transformer_options = transformer_options_of(args, kwargs)
        self._sigma, self._inputs, self._deltas, self._block_args, self._branches = float(t.flatten()[0]), None, [], [], []
        out = executor(x, t, *args, **kwargs)
        if self._inputs is not None and len(self._deltas) == self.adapter.block_count:
            conds = tuple(transformer_options.get("uuids") or ())
            block_args = self._block_args if self.subset_size is None else []
            self.evaluations.append(Evaluation(conds, self._sigma, self._inputs, torch.stack(self._deltas, dim=1),
                                               block_args, self._branches))
            if len(self.evaluations) == 1 and self.on_first is not None:
                self.on_first(self.evaluations[0])
        return out

    def _block(self, block_id, call, args):
        kept = self.adapter.copy_tokens(block_id, args)
        if self.keep_branches:
            out, branches = self.adapter.record_block(block_id, call, args)
            self._branches.append(map_tensors(branches, lambda t: t.detach().cpu()))
        else:
            out = call(args)
        if block_id == 0:
            self._count = self.adapter.tokens_in(0, kept).shape[1]
        joint_in = self.adapter.tokens_in(block_id, kept, self._count)
        joint_out = self.adapter.tokens_out(block_id, out, self._count)
        if self._inputs is None:
            if self.subset_size is not None and (self.subset is None or self.subset.numel() > joint_in.shape[1]):
                count = min(self.subset_size, joint_in.shape[1])
                self.subset = torch.randperm(joint_in.shape[1], generator=self.generator)[:count].sort().values
            # the tokens on the CPU, the block's other inputs as they are (shared with block_args)
            self._inputs = PlanningInput(joint_in.detach().cpu(),
                                         self.adapter.copy_tokens(0, kept, lambda t: t.detach().cpu()))
        if self.subset_size is None:
            delta = joint_out - joint_in
            self._block_args.append(self.adapter.rest_of_inputs(block_id, kept, self._count))
        else:
            subset = self.subset.to(joint_in.device)
            delta = joint_out[:, subset] - joint_in[:, subset]
        self._deltas.append(delta.detach().cpu())
        return out


def _gib(count: float) -> str:
    return f"{count / 2**30:.2f} GiB"


def recorded_bytes(evaluation: Evaluation) -> int:
    """Bytes one recorded evaluation keeps: block outputs, the first block's
    inputs, and (chained) every block's other inputs, each tensor once."""
    sizes = {}

    def count(tensor):
        sizes[id(tensor)] = tensor.numel() * tensor.element_size()
        return tensor
    evaluation.inputs.map(count)
    count(evaluation.deltas)
    for args in evaluation.block_args:
        map_block_args(args, count)
    map_tensors(evaluation.branches, count)
    return sum(sizes.values())


def trajectory_bytes(evaluation: Evaluation, settings: TrainingSettings, rows_per_step: int) -> float:
    """What recording one trajectory keeps, projected from its first evaluation."""
    return recorded_bytes(evaluation) / evaluation.deltas.shape[0] * rows_per_step * settings.steps


def check_training_memory(evaluation: Evaluation, settings: TrainingSettings, rows_per_step: int,
                          free_bytes=None) -> str:
    """From the first recorded evaluation: what recording a trajectory keeps
    in RAM, and at most two of them while the next is recorded. A ValueError
    naming the cheaper choices where that exceeds 90 % of the free RAM
    (`free_bytes`, by default ComfyUI's measure); otherwise the estimate, for
    the node to show."""
    rows = evaluation.deltas.shape[0]
    trajectory = trajectory_bytes(evaluation, settings, rows_per_step)
    free = comfy.model_management.get_free_memory(torch.device("cpu")) if free_bytes is None else free_bytes
    text = (f"TokenCache training ({settings.objective}): about {_gib(trajectory)} of block outputs per trajectory "
            f"({settings.steps} steps x {rows_per_step} rows), {_gib(2 * trajectory)} at most; {_gib(free)} RAM free")
    if 2 * trajectory <= 0.9 * free:
        return text
    tokens = evaluation.inputs.tokens.shape[1]
    deltas = evaluation.deltas.numel() * evaluation.deltas.element_size() / rows
    inputs = evaluation.inputs.tokens.numel() * evaluation.inputs.tokens.element_size() / rows
    cheaper = []
    if settings.objective in THROUGH_BLOCKS:
        kept = min(1.0, settings.max_tokens / tokens)
        first_order = 2 * (deltas * kept + inputs) * rows_per_step * settings.steps
        cheaper.append(f"objective first_order (it keeps {min(settings.max_tokens, tokens)} of the {tokens} tokens: "
                       f"about {_gib(first_order)})")
    cheaper += [f"fewer steps ({settings.steps} now: memory grows with them)",
                f"a smaller latent batch or size ({rows_per_step} rows of {tokens} tokens per step now)"]
    raise ValueError(f"{text}: it would not fit. Use {', or '.join(cheaper)}.")


def memory_check(settings: TrainingSettings, latent: dict, notify):
    """check_training_memory for a run of `latent` (cond and uncond rows unless cfg is 1), its estimate to notify()."""
    rows_per_step = latent["samples"].shape[0] * (1 if settings.cfg == 1.0 else 2)
    return lambda evaluation: notify(check_training_memory(evaluation, settings, rows_per_step))


def record_trajectory(model, positive, negative, latent: dict, settings: TrainingSettings, seed: int,
                      on_first=None):
    """Evaluations of one real sampling run (uncached) with noise seed `seed`."""
    adapter = adapter_for(model)
    subset_size = None if settings.objective in THROUGH_BLOCKS else settings.max_tokens
    recorder = _Recorder(adapter, subset_size, torch.Generator().manual_seed(seed), on_first,
                         branches=settings.objective == "p_step")
    recording = model.clone()
    recorder.install(recording)
    sample_for_training(recording, settings, positive, negative, latent, seed)
    return recorder.take(), recorder.subset


def _pairs(evaluations):
    """(previous, current): each evaluation with the last earlier one of the same
    conds (CFG may run cond and uncond batched or one at a time)."""
    pairs, last = [], {}
    for evaluation in evaluations:
        previous = last.get(evaluation.conds)
        if previous is not None and previous.deltas.shape == evaluation.deltas.shape:
            pairs.append((previous, evaluation))
        last[evaluation.conds] = evaluation
    return pairs


def calibrate(evaluations, predictor=None, device=None) -> dict:
    """Phase 1 of Two-Phase Round-Robin, on a calibration run: per sigma, the
    measured cost of reusing every block output of the previous step
    ("measured": the soft-reuse error with every token reused, the quantity
    the predictor is trained against) and, with a predictor, its mean
    predicted importance ("predicted", the paper's measure). I-steps go where
    the chosen one accumulates."""
    measured, predicted = {}, {}
    for previous, current in _pairs(evaluations):
        sigma = round(current.sigma, 6)
        reuse_all = torch.zeros(current.deltas.shape[:3])
        measured.setdefault(sigma, []).append(float(soft_reuse_loss(reuse_all, current.deltas, previous.deltas,
                                                                    0.0)[1]["error"]))
        if predictor is not None:
            with torch.no_grad():
                scores = predictor.score(_on_device(current.inputs, device), torch.tensor([current.sigma], device=device))
            predicted.setdefault(sigma, []).append(float(scores.float().mean()))
    sigmas = sorted(measured, reverse=True)
    calibration = {"sigmas": sigmas, "measured": [sum(measured[s]) / len(measured[s]) for s in sigmas]}
    if predictor is not None:
        calibration["predicted"] = [sum(predicted[s]) / len(predicted[s]) for s in sigmas]
    return calibration


def _recorded(model, positive, negative, latent, settings, seed, on_first=None):
    """A trajectory recorded without autograd, its tensors made usable by autograd."""
    with torch.inference_mode():
        evaluations, subset = record_trajectory(model, positive, negative, latent, settings, seed, on_first)
    copy = copy_each_once()
    usable = [Evaluation(e.conds, e.sigma, e.inputs.map(copy), e.deltas.clone(),
                         [map_block_args(args, copy) for args in e.block_args], map_tensors(e.branches, copy))
              for e in evaluations]
    return usable, None if subset is None else subset.clone()


def _on_device(inputs: PlanningInput, device) -> PlanningInput:
    return inputs.map(lambda t: t.to(device))


def _new_predictor(adapter, settings):
    torch.manual_seed(settings.seed)
    if settings.architecture == "first_block":
        predictor = FirstBlockPredictor(adapter.predictor_block(), adapter.predictor_runner(), adapter.hidden,
                                        adapter.block_count, adapter.first_block_kind)
        groups = [{"params": list(predictor.block.parameters()), "lr": settings.learning_rate * BLOCK_LR_SCALE},
                  {"params": list(predictor.head_norm.parameters()) + list(predictor.head.parameters())}]
    else:
        predictor = CachePredictor(adapter.hidden, adapter.block_count, width=settings.width)
        groups = [{"params": list(predictor.parameters())}]
    return predictor, groups


def _pair_loss(adapter, predictor, previous, current, settings, device, subset):
    inputs = _on_device(current.inputs, device)
    scores = predictor.score(inputs, torch.tensor([current.sigma], device=device))
    if scores is None:
        raise ValueError(f"the first-block predictor cannot read this {adapter.family} model's inputs (per-token "
                         "modulation without a known row for each token); use architecture mlp_mixer")
    if settings.objective == "first_order":
        return soft_reuse_loss(scores[:, :, subset.to(device)], current.deltas.to(device), previous.deltas.to(device),
                               settings.cost_weight)[0]
    start = inputs.tokens
    fresh = current.deltas.to(device)
    target = start.float() + fresh.float().sum(dim=1)
    txt_len = adapter.text_length(inputs.block_args)

    def run_block(block_id, x):
        return adapter.block_contribution(block_id, x, current.block_args[block_id], txt_len, start.dtype)
    if settings.objective == "chained":
        return chained_reuse_loss(scores, start, run_block, previous.deltas.to(device), target, settings.cost_weight)[0]
    cached_from = adapter.block_count - settings.protected_last_blocks

    def p_step_block(block_id, x, a):
        if block_id >= cached_from:
            return run_block(block_id, x)    # protected: computes in full at P-steps
        cached = map_tensors(previous.branches[block_id], lambda t: t.to(device))
        return adapter.p_step_contribution(block_id, x, current.block_args[block_id], txt_len, start.dtype, a, cached)
    return soft_run_loss(scores, start, p_step_block, target, settings.cost_weight)[0]


@contextlib.contextmanager
def _differentiable_ops():
    """ComfyUI's fused kernels (rotary embedding) have no backward; its own
    training nodes switch to the plain torch versions with this flag."""
    before = comfy.model_management.in_training
    comfy.model_management.in_training = True
    try:
        yield
    finally:
        comfy.model_management.in_training = before


def _optimise(model, positive, negative, latent, settings, adapter, progress, notify):
    device = model.load_device
    pairs, trajectory, last_evaluations, subset = [], 0, [], None
    predictor = optimizer = None
    losses = []
    for iteration in range(settings.iterations):
        comfy.model_management.throw_exception_if_processing_interrupted()
        if not pairs:
            # the memory check, once, at the first model evaluation
            on_first = memory_check(settings, latent, notify) if trajectory == 0 else None
            last_evaluations, subset = _recorded(model, positive, negative, latent, settings, settings.seed + trajectory,
                                                 on_first)
            trajectory += 1
            found = _pairs(last_evaluations)
            if not found:
                raise ValueError("TokenCache training: the sampling run gave fewer than two model evaluations; "
                                 "use at least 2 steps")
            order = torch.randperm(len(found), generator=torch.Generator().manual_seed(settings.seed + trajectory))
            pairs = [found[int(j)] for j in order]
            # the chained objective runs the model's blocks: their weights must be loaded
            comfy.model_management.load_models_gpu([model])
            if predictor is None:
                # after a sampling run, so the copied first block carries the weight patches (LoRA) in use
                predictor, groups = _new_predictor(adapter, settings)
                predictor.to(device)
                optimizer = torch.optim.Adam(groups, lr=settings.learning_rate)
        previous, current = pairs.pop()
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        with _differentiable_ops():
            loss = _pair_loss(adapter, predictor, previous, current, settings, device, subset)
            # gradients for the predictor only: the frozen model's weights get none
            grads = torch.autograd.grad(loss, parameters, allow_unused=True)
        training_step(optimizer, parameters, grads)
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(iteration + 1, settings.iterations, losses[-1])
    return predictor, losses, trajectory, last_evaluations


def check_family(settings: TrainingSettings, adapter) -> None:
    """Refuse, before anything runs, what needs a backward pass through blocks that cannot give one."""
    if adapter.autograd_through_blocks:
        return
    needs = [choice for choice, used in (("architecture first_block", settings.architecture == "first_block"),
                                         (f"objective {settings.objective}", settings.objective in THROUGH_BLOCKS),
                                         (f"lora_rank {settings.lora_rank}", settings.lora_rank > 0)) if used]
    if needs:
        raise ValueError(f"TokenCache training: {adapter.family} blocks update their tensors in place, so autograd "
                         f"cannot run through them, which {', '.join(needs)} need; use architecture mlp_mixer, "
                         "objective first_order and lora_rank 0")


def train_predictor(model, positive, negative, latent: dict, settings: TrainingSettings, progress=None, notify=None):
    """Train a predictor for `model`; returns (predictor on the CPU, metadata for
    the file). `progress(iteration, total, loss)` is called after every
    iteration, notify(text) with the memory estimate (check_training_memory,
    which refuses a setting that would not fit after the first model
    evaluation); ComfyUI's cancel raises out of here between iterations."""
    settings.check()
    adapter = adapter_for(model)
    check_family(settings, adapter)
    # ComfyUI runs nodes under inference mode: the predictor trains outside it
    with torch.inference_mode(False), torch.enable_grad():
        predictor, losses, trajectory, last_evaluations = _optimise(model, positive, negative, latent, settings,
                                                                    adapter, progress, notify or logging.info)
    predictor.eval()
    calibration = calibrate(last_evaluations, predictor, model.load_device)
    metadata = {
        "family": adapter.family_key,
        "hidden_size": adapter.hidden,
        "blocks": adapter.block_count,
        "block_counts": adapter.block_layout(),
        "token_layout": adapter.token_layout,
        "training": {**settings.__dict__, "trajectories": trajectory, **loss_windows(losses)},
        "calibration": calibration,
    }
    logging.info(f"TokenCache predictor ({settings.architecture}, {settings.objective}): {settings.iterations} "
                 f"iterations on {trajectory} trajectories, loss {metadata['training']['first_loss']:.4f} -> "
                 f"{metadata['training']['final_loss']:.4f}")
    return predictor.cpu(), metadata


def train_with_refinement(model, positive, negative, latent: dict, settings: TrainingSettings, progress=None,
                          notify=None):
    """train_predictor, then (settings.lora_rank > 0) the LoRA refinement of
    the last settings.protected_last_blocks blocks under TokenCache with that
    predictor. Returns (predictor, metadata, BlockLoRA or None); progress
    counts both phases."""
    settings.check()
    check_family(settings, adapter_for(model))
    phases = 2 if settings.lora_rank else 1
    if settings.lora_rank:
        _check_refined_blocks(settings, adapter_for(model))   # before the predictor's training, not after

    def phase(offset):
        if progress is None:
            return None
        return lambda done, total, loss: progress(offset + done, phases * total, loss)
    predictor, metadata = train_predictor(model, positive, negative, latent, settings, phase(0), notify)
    if not settings.lora_rank:
        return predictor, metadata, None
    return predictor, metadata, refine(model, predictor, metadata, positive, negative, latent, settings,
                                       phase(settings.iterations))


def _check_refined_blocks(settings: TrainingSettings, adapter) -> None:
    if not 1 <= settings.protected_last_blocks < adapter.block_count:
        raise ValueError(f"TokenCache LoRA refinement: protected_last_blocks={settings.protected_last_blocks}; the "
                         f"adapters go on the last blocks, and earlier ones must cache: use 1 to "
                         f"{adapter.block_count - 1} for this model, or lora_rank 0")


def refine(model, predictor, metadata: dict, positive, negative, latent: dict, settings: TrainingSettings,
           progress=None):
    """The LoRA refinement for a trained predictor (its file's metadata: the
    I-steps follow its measured calibration); the training summary goes into
    metadata["training"]["lora"]. Returns the BlockLoRA."""
    adapter = adapter_for(model)
    check_family(settings, adapter)
    _check_refined_blocks(settings, adapter)
    calibration = metadata["calibration"]
    curve = calibration.get("measured", calibration.get("importance"))
    with torch.inference_mode(False), torch.enable_grad():
        lora, summary = train_lora(model, adapter, predictor.to(model.load_device),
                                   {"sigmas": calibration["sigmas"], "importance": curve},
                                   positive, negative, latent, settings, progress, differentiable=_differentiable_ops)
    predictor.cpu()
    metadata["training"]["lora"] = {**summary, "rank": settings.lora_rank, "cache_ratio": settings.cache_ratio,
                                    "i_steps": settings.i_steps, "protected_last_blocks": settings.protected_last_blocks,
                                    "iterations": settings.lora_iterations, "learning_rate": settings.learning_rate}
    return lora


def predictor_expectations(adapter) -> dict:
    """What a predictor file must have been trained for to drive the model of
    `adapter` (adapter_for)."""
    # files written before families had keys name the family by its label
    return {"family": (adapter.family_key, adapter.family), "hidden_size": adapter.hidden,
            "blocks": adapter.block_count, "token_layout": adapter.token_layout}

