"""Training a TokenCache predictor on the user's own model, prompts and sampler.

The diffusion model stays frozen and is only run forward: block-replace
patches on a clone record, at every model evaluation of a real ComfyUI
sampling run, the tokens entering the first block and every block's residual
contribution f_l(x) = block(x) - x. Consecutive evaluations give (fresh,
cached) pairs for the soft-reuse objective (accel_core.tokencache). Each
trajectory uses a new noise seed; the deltas are kept for a fixed random
subset of tokens, so memory stays bounded on large models while the predictor
still sees every token.
"""
import logging
from dataclasses import dataclass

import torch

import comfy.model_management
import comfy.patcher_extension
import comfy.sample
import comfy.utils

from ..accel_core.tokencache import CachePredictor, soft_reuse_loss
from .families import tokencache_adapter_for
from .patcher import transformer_options_of

TOKEN_LAYOUT = "cat(txt, img): the tokens entering the first double-stream block"


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
    max_tokens: int = 1024     # tokens whose block deltas are recorded per trajectory
    width: int = 64            # predictor width


@dataclass
class Evaluation:
    conds: tuple               # uuids of the conds in the batch
    sigma: float
    features: torch.Tensor     # [B, L, D] entering the first block
    deltas: torch.Tensor       # [B, n_blocks, S, D] at the recorded token subset


class _Recorder:
    """Block-replace patches and an APPLY_MODEL wrapper that record one
    sampling run's evaluations."""

    def __init__(self, adapter, subset_size: int, generator: torch.Generator):
        self.adapter = adapter
        self.subset_size = subset_size
        self.generator = generator
        self.subset = None
        self.evaluations = []
        self._sigma = None
        self._features = None
        self._deltas = []

    def install(self, model_patcher):
        for i in range(len(self.adapter.double_blocks)):
            model_patcher.set_model_patch_replace(self._double, "dit", "double_block", i)
        for i in range(len(self.adapter.single_blocks)):
            model_patcher.set_model_patch_replace(self._single, "dit", "single_block", i)
        model_patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "dit_token_cache_recorder",
                                           self._evaluation)

    def _evaluation(self, executor, x, t, *args, **kwargs):
        transformer_options = transformer_options_of(args, kwargs)
        self._sigma, self._features, self._deltas = float(t.flatten()[0]), None, []
        out = executor(x, t, *args, **kwargs)
        if self._features is not None and len(self._deltas) == self.adapter.block_count:
            conds = tuple(transformer_options.get("uuids") or ())
            self.evaluations.append(Evaluation(conds, self._sigma, self._features, torch.stack(self._deltas, dim=1)))
        return out

    def _keep(self, joint_in, joint_out):
        if self._features is None:
            if self.subset is None or self.subset.numel() > joint_in.shape[1]:
                count = min(self.subset_size, joint_in.shape[1])
                self.subset = torch.randperm(joint_in.shape[1], generator=self.generator)[:count].sort().values
            self._features = joint_in.detach().float().cpu()
        subset = self.subset.to(joint_in.device)
        self._deltas.append((joint_out[:, subset] - joint_in[:, subset]).detach().float().cpu())

    def _double(self, args, extra):
        # ComfyUI's blocks add to their inputs in place: keep copies
        joint_in = torch.cat((args["txt"], args["img"]), dim=1)
        out = extra["original_block"](args)
        self._keep(joint_in, torch.cat((out["txt"], out["img"]), dim=1))
        return out

    def _single(self, args, extra):
        x_in = args["img"].clone()
        out = extra["original_block"](args)
        self._keep(x_in, out["img"])
        return out


def record_trajectory(model, positive, negative, latent: dict, settings: TrainingSettings, seed: int):
    """Evaluations of one real sampling run (uncached) with noise seed `seed`."""
    adapter = tokencache_adapter_for(model)
    recorder = _Recorder(adapter, settings.max_tokens, torch.Generator().manual_seed(seed))
    recording = model.clone()
    recorder.install(recording)
    latent_image = comfy.sample.fix_empty_latent_channels(recording, latent["samples"])
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    comfy.sample.sample(recording, noise, settings.steps, settings.cfg, settings.sampler_name, settings.scheduler,
                        positive, negative, latent_image, denoise=1.0, noise_mask=latent.get("noise_mask"),
                        disable_pbar=True, seed=seed)
    return recorder.evaluations, recorder.subset


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


def calibrate(evaluations) -> dict:
    """Phase 1 of Two-Phase Round-Robin: how much reusing the previous step's
    block outputs would cost at each sigma, measured on a calibration run (the
    soft-reuse error with every token reused, the quantity the predictor is
    trained against). I-steps then go where it accumulates."""
    by_sigma = {}
    for previous, current in _pairs(evaluations):
        reuse_all = torch.zeros(current.deltas.shape[:3])
        error = float(soft_reuse_loss(reuse_all, current.deltas, previous.deltas, 0.0)[1]["error"])
        by_sigma.setdefault(round(current.sigma, 6), []).append(error)
    sigmas = sorted(by_sigma, reverse=True)
    return {"sigmas": sigmas, "importance": [sum(by_sigma[s]) / len(by_sigma[s]) for s in sigmas]}


def _recorded(model, positive, negative, latent, settings, seed):
    """A trajectory recorded without autograd, its tensors made usable by autograd."""
    with torch.inference_mode():
        evaluations, subset = record_trajectory(model, positive, negative, latent, settings, seed)
    return [Evaluation(e.conds, e.sigma, e.features.clone(), e.deltas.clone()) for e in evaluations], subset.clone()


def _optimise(model, positive, negative, latent, settings, adapter, progress):
    torch.manual_seed(settings.seed)
    predictor = CachePredictor(adapter.hidden, adapter.block_count, width=settings.width)
    optimizer = torch.optim.Adam(predictor.parameters(), lr=settings.learning_rate)
    pairs, trajectory, last_evaluations = [], 0, []
    losses = []
    for iteration in range(settings.iterations):
        comfy.model_management.throw_exception_if_processing_interrupted()
        if not pairs:
            last_evaluations, subset = _recorded(model, positive, negative, latent, settings, settings.seed + trajectory)
            trajectory += 1
            found = _pairs(last_evaluations)
            if not found:
                raise ValueError("TokenCache training: the sampling run gave fewer than two model evaluations; "
                                 "use at least 2 steps")
            order = torch.randperm(len(found), generator=torch.Generator().manual_seed(settings.seed + trajectory))
            pairs = [found[int(j)] for j in order]
        previous, current = pairs.pop()
        scores = predictor(current.features, torch.tensor([current.sigma]))[:, :, subset]
        loss, _ = soft_reuse_loss(scores, current.deltas, previous.deltas, settings.cost_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(iteration + 1, settings.iterations, losses[-1])
    return predictor, losses, trajectory, last_evaluations


def train_predictor(model, positive, negative, latent: dict, settings: TrainingSettings, progress=None):
    """Train a predictor for `model`; returns (predictor, metadata for the file).
    `progress(iteration, total, loss)` is called after every iteration; ComfyUI's
    cancel raises out of here between iterations."""
    adapter = tokencache_adapter_for(model)
    # ComfyUI runs nodes under inference mode: the predictor trains outside it
    with torch.inference_mode(False), torch.enable_grad():
        predictor, losses, trajectory, last_evaluations = _optimise(model, positive, negative, latent, settings,
                                                                    adapter, progress)
    predictor.eval()
    window = max(1, min(20, len(losses)))
    metadata = {
        "family": adapter.family,
        "hidden_size": adapter.hidden,
        "blocks": adapter.block_count,
        "block_counts": {"double": len(adapter.double_blocks), "single": len(adapter.single_blocks)},
        "token_layout": TOKEN_LAYOUT,
        "training": {**settings.__dict__, "trajectories": trajectory,
                     "first_loss": sum(losses[:window]) / window, "final_loss": sum(losses[-window:]) / window},
        "calibration": calibrate(last_evaluations),
    }
    logging.info(f"TokenCache predictor: {settings.iterations} iterations on {trajectory} trajectories, "
                 f"loss {metadata['training']['first_loss']:.4f} -> {metadata['training']['final_loss']:.4f}")
    return predictor, metadata


def predictor_expectations(model) -> dict:
    """What a predictor file must have been trained for to drive `model`."""
    adapter = tokencache_adapter_for(model)
    return {"family": adapter.family, "hidden_size": adapter.hidden, "blocks": adapter.block_count,
            "token_layout": TOKEN_LAYOUT}

