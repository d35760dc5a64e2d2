"""TokenCache's LoRA refinement of the last blocks, trained on the user's model
(arXiv 2409.18523, sec. 3.4).

Data: real sampling runs of the model with TokenCache on (the trained
predictor, the node's cache ratio, I-steps and protected blocks), so every
input the last blocks see is what they see at inference. At each P-step the
model runs twice on the same input: once with the cache off, whose output
layer result (the model's prediction, per image token) is the target, and
once cached, where the input of the first protected block is recorded. The
adapters then learn, with the model frozen, to bring the prediction made
from the cached input to the target. The loss is taken after the output
layer, not on the hidden state: the output layer's normalisation discards
most of the hidden state's scale, and the text tokens it never reads.
The family adapter says how to wrap a block, read its tokens and run it for
autograd; nothing here knows a family's layout.
"""
import contextlib
import functools
import logging
from dataclasses import dataclass

import torch

import comfy.model_management
import comfy.patcher_extension
import comfy.sample

from ..accel_core.config import CacheConfig
from ..accel_core.lora import BlockLoRA, LoRASpec, adapted_forward, linear_layers
from ..accel_core.schedule import StepKind
from ..accel_core.tokencache import (call_for_autograd, copy_each_once, loss_windows, map_block_args, map_tensors,
                                     training_step)
from .patcher import RUN_KEY, apply_token_cache, transformer_options_of

RECORDER_KEY = "dit_token_cache_lora_recorder"


@dataclass
class LoRASample:
    sigma: float
    tokens: torch.Tensor     # [B, L, D] entering the first protected block in the cached run, planning space (CPU)
    block_args: list         # each protected block's other inputs (CPU)
    txt_len: int
    chunks: list             # cond_or_uncond of the evaluation: 0 cond, 1 uncond, one per batch chunk
    output_inputs: tuple     # (args after the tokens, kwargs) the output layer got
    target: torch.Tensor     # [B, N, C] the output layer's result with the cache off, same model input (CPU)
    cached: torch.Tensor     # [B, N, C] its result with the cache on and no adapters (CPU)


def _usable(sample: LoRASample) -> LoRASample:
    """The sample's tensors copied outside inference mode (copy_each_once)."""
    copy = copy_each_once()
    return LoRASample(sample.sigma, sample.tokens.clone(), [map_block_args(args, copy) for args in sample.block_args],
                      sample.txt_len, sample.chunks, map_tensors(sample.output_inputs, copy), sample.target.clone(),
                      sample.cached.clone())


class _PStepRecorder:
    """Wraps a TokenCache clone so each P-step yields one LoRASample."""

    def __init__(self, adapter, blocks: list):
        self.adapter = adapter
        self.blocks = blocks           # the protected block ids, in order
        self.samples = []
        self._phase = None             # "target" (cache off) or "cached"
        self._target = None
        self._cached = None
        self._tokens = None
        self._txt_len = 0
        self._count = None             # tokens in the planning space (from the first block)
        self._args = {}

    def take(self) -> list:
        """The samples, and nothing of them kept here (the clone's patches and
        the recorder form a cycle the garbage collector frees late)."""
        samples, self.samples = self.samples, []
        self._target = self._cached = self._tokens = None
        self._args = {}
        return samples

    def install(self, model_patcher):
        for block_id in sorted({0, *self.blocks}):
            self.adapter.wrap_block(model_patcher, block_id, functools.partial(self._block, block_id))
        name = f"diffusion_model.{self.adapter.output_layer}.forward"
        model_patcher.add_object_patch(name, functools.partial(self._output, model_patcher.get_model_object(name)))
        model_patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, RECORDER_KEY,
                                           self._evaluation)

    def _evaluation(self, executor, x, t, *args, **kwargs):
        run = transformer_options_of(args, kwargs).get(RUN_KEY)
        if run is None or run.plan is None or run.plan.kind is not StepKind.CONSERVATIVE:
            return executor(x, t, *args, **kwargs)
        plan, run.plan = run.plan, None      # the cache's patches run the host's blocks
        self._phase, self._target, self._cached, self._tokens, self._args = "target", None, None, None, {}
        try:
            executor(x, t, *args, **kwargs)
        finally:
            run.plan = plan
        self._phase = "cached"
        try:
            out = executor(x, t, *args, **kwargs)
        finally:
            self._phase = None
        if self._target is not None and self._cached is not None and self._tokens is not None \
                and len(self._args) == len(self.blocks):
            self.samples.append(LoRASample(float(t.flatten()[0]), self._tokens,
                                           [self._args[b] for b in self.blocks], self._txt_len,
                                           list(transformer_options_of(args, kwargs).get("cond_or_uncond") or []),
                                           *self._target, self._cached))
        return out

    def _output(self, forward, tokens, *args, **kwargs):
        out = forward(tokens, *args, **kwargs)
        if self._phase == "target":
            self._target = (map_tensors((args, kwargs), lambda t: t.detach().cpu()), out.detach().cpu().clone())
        elif self._phase == "cached":
            self._cached = out.detach().cpu().clone()
        return out

    def _block(self, block_id, call, args):
        if self._phase == "cached":
            if block_id == 0:
                self._count = self.adapter.tokens_in(0, args).shape[1]
            if block_id == self.blocks[0]:
                self._tokens = self.adapter.tokens_in(block_id, args, self._count).detach().cpu().clone()
                self._txt_len = self.adapter.text_length(args)
            if block_id in self.blocks:
                # not copied: blocks update only their token inputs in place
                self._args[block_id] = map_block_args(self.adapter.rest_of_inputs(block_id, args, self._count),
                                                      lambda t: t.detach().cpu())
        return call(args)


def sample_for_training(model_patcher, settings, positive, negative, latent: dict, seed: int) -> None:
    """One sampling run of `model_patcher` with the trainer's sampler settings
    and noise seed `seed`, through ComfyUI's own sample(): what the recorders
    installed on it see."""
    latent_image = comfy.sample.fix_empty_latent_channels(model_patcher, latent["samples"])
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    comfy.sample.sample(model_patcher, noise, settings.steps, settings.cfg, settings.sampler_name, settings.scheduler,
                        positive, negative, latent_image, denoise=1.0, noise_mask=latent.get("noise_mask"),
                        disable_pbar=True, seed=seed)


def protected_blocks(adapter, protected_last_blocks: int) -> list:
    return list(range(max(0, adapter.block_count - protected_last_blocks), adapter.block_count))


def record_p_steps(model, adapter, predictor, calibration, config: CacheConfig, positive, negative, latent: dict,
                   settings, seed: int) -> list:
    """LoRASamples of one TokenCache sampling run with noise seed `seed`."""
    cached = apply_token_cache(model, config, name="TokenCache[lora training]", predictor=predictor,
                               calibration=calibration)
    recorder = _PStepRecorder(adapter, protected_blocks(adapter, config.protected_last_blocks))
    recorder.install(cached)
    with torch.inference_mode():
        sample_for_training(cached, settings, positive, negative, latent, seed)
    return [_usable(sample) for sample in recorder.take()]


def new_lora(adapter, protected_last_blocks: int, rank: int, seed: int) -> BlockLoRA:
    """Zero-effect adapters on every linear layer of the protected blocks."""
    blocks = protected_blocks(adapter, protected_last_blocks)
    paths = adapter.block_paths()
    shapes = linear_layers([paths[b] for b in blocks])
    torch.manual_seed(seed)
    return BlockLoRA(LoRASpec(rank, float(rank), tuple(blocks), tuple(sorted(shapes))), shapes)


@contextlib.contextmanager
def adapters_on(diffusion_model, lora: BlockLoRA):
    """The adapters added to their layers' forwards for the duration (training:
    the model is not being sampled, so its modules are set directly and
    restored after)."""
    changed = []
    try:
        for layer in lora.spec.layers:
            module = diffusion_model.get_submodule(layer)
            had = "forward" in module.__dict__
            changed.append((module, had, module.__dict__.get("forward")))
            module.forward = functools.partial(adapted_forward, module.forward, lora.adapter(layer), lambda: True, None)
        yield
    finally:
        for module, had, before in reversed(changed):
            if had:
                module.forward = before
            else:
                del module.forward


def guided(out: torch.Tensor, chunks: list, cfg: float) -> torch.Tensor:
    """What the sampler uses of an evaluation's outputs: uncond + cfg (cond -
    uncond) where the evaluation holds both (batched CFG), else the outputs."""
    if 0 not in chunks or 1 not in chunks or out.shape[0] % len(chunks):
        return out
    parts = out.chunk(len(chunks))
    cond, uncond = parts[chunks.index(0)], parts[chunks.index(1)]
    return uncond + cfg * (cond - uncond)


def refinement_loss(adapter, sample: LoRASample, blocks: list, device, dtype, cfg: float = 1.0) -> torch.Tensor:
    """||output layer(protected blocks(cached input)) - target||^2 over the
    tokens the output layer reads, after classifier-free guidance where the
    evaluation batches cond and uncond, relative to the same error without
    adapters. Relative per step: a step whose cache error is small (late,
    low-noise steps, which shape the image's detail) must not be traded for
    a large one at a noisy step that later steps correct anyway."""
    x = sample.tokens.to(device)
    for block_id, args in zip(blocks, sample.block_args):
        args = map_block_args(args, lambda t: t.to(device))
        x = x + adapter.block_contribution(block_id, x, args, sample.txt_len, dtype)
    target = sample.target.to(device).float()
    args, kwargs = map_tensors(sample.output_inputs, lambda t: t.to(device))
    output_layer = adapter.diffusion_model.get_submodule(adapter.output_layer)
    out = call_for_autograd(output_layer, adapter.output_tokens(x, target.shape[1]), *args, **kwargs)
    out, target = guided(out.float(), sample.chunks, cfg), guided(target, sample.chunks, cfg)
    cached = guided(sample.cached.to(device).float(), sample.chunks, cfg)
    return (out - target).pow(2).mean() / (cached - target).pow(2).mean().clamp_min(1e-12)


def lora_config(settings) -> CacheConfig:
    """The TokenCache setting the adapters are trained under (and meant for)."""
    return CacheConfig(mode="tokencache", cache_ratio=settings.cache_ratio, i_steps=settings.i_steps,
                       protected_last_blocks=settings.protected_last_blocks, forecast="reuse")


def train_lora(model, adapter, predictor, calibration, positive, negative, latent, settings, progress=None,
               differentiable=contextlib.nullcontext):
    """Adapters for the last `settings.protected_last_blocks` blocks of `model`,
    trained for `settings.lora_iterations` steps on P-steps of TokenCache runs
    with `predictor`. Returns (BlockLoRA on the CPU, {first_loss, final_loss,
    trajectories}); the losses start at the cost of caching (adapters at
    zero) and are normalised by the protected blocks' contribution."""
    device = model.load_device
    config = lora_config(settings)
    blocks = protected_blocks(adapter, settings.protected_last_blocks)
    lora = new_lora(adapter, settings.protected_last_blocks, settings.lora_rank, settings.seed).to(device)
    optimizer = torch.optim.Adam(lora.parameters(), lr=settings.learning_rate)
    diffusion_model = model.model.diffusion_model
    samples, trajectory, losses = [], 0, []
    for iteration in range(settings.lora_iterations):
        comfy.model_management.throw_exception_if_processing_interrupted()
        if not samples:
            found = record_p_steps(model, adapter, predictor, calibration, config, positive, negative, latent,
                                   settings, settings.seed + 1000 + trajectory)
            trajectory += 1
            if not found:
                raise ValueError(f"TokenCache LoRA refinement: the run had no P-step (steps={settings.steps}, "
                                 f"i_steps={settings.i_steps}); use more steps than I-steps")
            comfy.model_management.load_models_gpu([model])
            order = torch.randperm(len(found), generator=torch.Generator().manual_seed(settings.seed + trajectory))
            samples = [found[int(j)] for j in order]
        sample = samples.pop()
        dtype = sample.tokens.dtype
        with differentiable(), adapters_on(diffusion_model, lora):
            loss = refinement_loss(adapter, sample, blocks, device, dtype, settings.cfg)
            parameters = list(lora.parameters())
            # adapters on layers the output layer does not depend on (the last block's text MLP) get none
            grads = torch.autograd.grad(loss, parameters, allow_unused=True)
        training_step(optimizer, parameters, grads)
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(iteration + 1, settings.lora_iterations, losses[-1])
    summary = {**loss_windows(losses), "trajectories": trajectory}
    logging.info(f"TokenCache LoRA (rank {settings.lora_rank}, last {settings.protected_last_blocks} blocks): "
                 f"{settings.lora_iterations} iterations, loss {summary['first_loss']:.4f} -> "
                 f"{summary['final_loss']:.4f}")
    return lora.cpu().eval(), summary
