"""The pack's caches against every pip-installable peer, on the reference model
in diffusers (reference/diffusers_model.py: an exact conversion), same labels,
seeds and machine, one process.

Per step count (20 and 50 by default, 64 samples, CFG 4 as one batch a step):
uncached Euler; fewer Euler steps and Heun (second order, 2 evaluations a step
but the last); ours (DuCa / ToCa / FORA, forecast reuse and linear, N = 2, 3,
5; and FORA N = 3, 5, 8 with the first 10 % or 20 % of steps in full, the
node's start_percent) through dit_token_cache.diffusers; diffusers' FirstBlockCache, TaylorSeerCache,
MagCache (ratios from its own calibration on this model, 8 other labels),
SeaCache, Pyramid Attention Broadcast and FasterCache; cache-dit's DBCache with
and without TaylorSeer correction. Quality against the uncached images: PSNR,
SSIM; class accuracy and FD against real drawings. Work: multiply-accumulates
of every linear layer that ran, over the uncached run's (it sees what each
cache skipped; attention is not in it, so caches that reuse or skip attention,
PAB and FasterCache above all, run faster than their work says); wall:
round-robin medians on the first --timing-batch labels.

How each peer is run here: SeaCache reads the latent from Flux's packed tokens
(its raw_vision_callback), PAB and FasterCache get the timestep from the loop
and Flux's attention names, FasterCache runs on a wrapper that returns the
image layout (its unconditional-branch estimate splits frequencies of a
[B, C, H, W] output), cache-dit runs on its own copy of the transformer (its
Flux patch stays after disable_cache) with Fn=1, Bn=0 (the model has 8 blocks)
and 2 warm-up steps.

    make bench-peers      # = python bench/bench_peers.py --out bench/out/peers --plot docs/peers_front.png
    python bench/bench_peers.py --quick --out DIR   # 4 samples, 6 steps: what the test runs
"""
import argparse
import copy
import functools
import json
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "harness"))
from pack_loader import import_pack  # noqa: E402

os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")   # cache-dit warns at every enable and disable
import_pack(comfy=False)   # the diffusers side alone: no ComfyUI in this process
from dit_token_cache.accel_core import metrics  # noqa: E402
from dit_token_cache.diffusers import apply_token_cache  # noqa: E402
from dit_token_cache.reference import codec, shapes  # noqa: E402
from dit_token_cache.reference.classifier import accuracy, load_classifier  # noqa: E402
from dit_token_cache.reference.diffusers_model import load_reference_transformer, predict, simple_sigmas, unpack  # noqa: E402
from dit_token_cache.reference.model import WEIGHTS, label_encoder  # noqa: E402


@dataclass
class Method:
    name: str
    family: str
    steps: int
    sampler: str = "euler"
    apply: Callable = None   # (model, sigmas) -> remove(); model is the transformer, or image_layout's wrapper
    image_layout: bool = False
    own_copy: bool = False   # cache-dit patches the transformer's forward for good: disable_cache leaves the patch


@functools.lru_cache(maxsize=None)
def own_copy(transformer):
    return copy.deepcopy(transformer)


class ImageLayout(torch.nn.Module):
    """The transformer as a denoiser of [B, C, H, W] latents, for FasterCache: its
    approximation of the unconditional branch splits the frequencies of an image-
    layout output, and Flux returns packed tokens."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, hidden_states, encoder_hidden_states, timestep):
        return predict(self.transformer, hidden_states, timestep, encoder_hidden_states)


def ours(**settings):
    def apply(transformer, sigmas):
        return apply_token_cache(transformer, scheduler=SimpleNamespace(sigmas=sigmas), **settings).remove
    return apply


def diffusers_cache(config):
    def apply(transformer, sigmas):
        transformer.enable_cache(config)
        return transformer.disable_cache
    return apply


def faster_cache(config):
    def apply(wrapper, sigmas):
        from diffusers.hooks import HookRegistry, apply_faster_cache
        from diffusers.hooks.faster_cache import _FASTER_CACHE_BLOCK_HOOK, _FASTER_CACHE_DENOISER_HOOK
        apply_faster_cache(wrapper, config)

        def remove():   # what ModelMixin.disable_cache does, on the wrapper (its hooks sit on the transformer's blocks)
            registry = HookRegistry.check_if_exists_or_initialize(wrapper)
            registry.remove_hook(_FASTER_CACHE_DENOISER_HOOK, recurse=True)
            registry.remove_hook(_FASTER_CACHE_BLOCK_HOOK, recurse=True)
        return remove
    return apply


def cache_dit(config, calibrator=None):
    def apply(transformer, sigmas):
        import cache_dit as package
        package.enable_cache(transformer, cache_config=config, calibrator_config=calibrator)
        package.refresh_context(transformer, num_inference_steps=len(sigmas) - 1)
        return lambda: package.disable_cache(transformer)
    return apply


def image_vision(module, args, kwargs):
    """SeaCache's view of the generated latent: [C, T=1, H, W] per sample, from Flux's packed tokens."""
    tokens = kwargs["hidden_states"]
    side = round(tokens.shape[1] ** 0.5) * 2
    return [latent.unsqueeze(1) for latent in unpack(tokens, side, side)]


def calibrated_mag_ratios(transformer, steps, cfg, seed) -> list:
    """MagCache's own calibration (calibrate=True) on this model and step count, on
    8 labels that are not the benchmark's."""
    from diffusers import MagCacheConfig
    from diffusers.hooks import mag_cache
    captured = []
    mag_cache.print = lambda *values, **kw: captured.append(" ".join(map(str, values)))   # it prints its ratios
    try:
        transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
        generate(transformer, denoiser(transformer), shapes.random_labels(8, torch.Generator().manual_seed(seed + 1)),
                 seed + 1, steps, cfg, "euler")
    finally:
        transformer.disable_cache()
        del mag_cache.print
    return json.loads(captured[-1])   # the ratios follow its "Calibration Complete" line


def methods_for(steps: int, quick: bool, mag_ratios: list) -> list:
    from cache_dit import DBCacheConfig, TaylorSeerCalibratorConfig
    from diffusers import (FasterCacheConfig, FirstBlockCacheConfig, MagCacheConfig, PyramidAttentionBroadcastConfig,
                           SeaCacheConfig, TaylorSeerCacheConfig)
    found = [Method("uncached", "uncached", steps)]
    for divisor in ((2,) if quick else (2, 3, 4, 5)):
        found.append(Method(f"{steps // divisor} euler steps", "fewer steps", steps // divisor))
        heun = (steps // divisor + 1) // 2    # 2 evaluations a step, the last step one
        if f"{heun} heun steps" not in [m.name for m in found]:
            found.append(Method(f"{heun} heun steps", "fewer steps heun", heun, "heun"))
    cycles = (3,) if quick else (2, 3, 5)
    for mode, label in (("duca", "DuCa"), ("toca", "ToCa"), ("fora", "FORA")):
        for forecast in ("reuse", "linear"):
            for n in cycles:
                found.append(Method(f"{label} N={n} {forecast}", f"ours {label} {forecast}", steps,
                                    apply=ours(mode=mode, cycle_length=n, forecast=forecast)))
    for n in (() if quick else (6, 8)):   # 5x and beyond: only FORA gets there
        for forecast in ("reuse", "linear"):
            found.append(Method(f"FORA N={n} {forecast}", f"ours FORA {forecast}", steps,
                                apply=ours(mode="fora", cycle_length=n, forecast=forecast)))
    # the node's start_percent: the first steps in full, where this model's trajectory turns most
    for start in ((0.2,) if quick else (0.1, 0.2)):
        for forecast in ("reuse", "linear"):
            for n in ((3,) if quick else (3, 5, 8, 10)):
                found.append(Method(f"FORA N={n} {forecast} start={start}", f"ours FORA from {start:.0%}", steps,
                                    apply=ours(mode="fora", cycle_length=n, forecast=forecast, start_percent=start)))
    for threshold in ((0.2,) if quick else (0.1, 0.2, 0.4, 0.6, 0.8, 1.0)):
        found.append(Method(f"FirstBlockCache t={threshold}", "diffusers FirstBlockCache", steps,
                            apply=diffusers_cache(FirstBlockCacheConfig(threshold=threshold))))
    for interval in ((3,) if quick else (2, 3, 5, 8)):
        found.append(Method(f"TaylorSeerCache interval={interval}", "diffusers TaylorSeerCache", steps,
                            apply=diffusers_cache(TaylorSeerCacheConfig(cache_interval=interval,
                                                                        disable_cache_before_step=1,
                                                                        taylor_factors_dtype=torch.float32))))
    # MagCache: K = consecutive skips allowed; the first 10 % of steps always run
    for threshold, skips in (((0.5, 4),) if quick else ((0.06, 3), (0.12, 3), (0.25, 4), (0.5, 6), (1.0, 10), (2.0, 20))):
        found.append(Method(f"MagCache t={threshold} K={skips}", "diffusers MagCache", steps,
                            apply=diffusers_cache(MagCacheConfig(threshold=threshold, max_skip_steps=skips,
                                                                 retention_ratio=0.1, num_inference_steps=steps,
                                                                 mag_ratios=mag_ratios))))
    for threshold in ((0.5,) if quick else (0.15, 0.3, 0.5, 1.0, 1.5, 2.0)):
        found.append(Method(f"SeaCache t={threshold}", "diffusers SeaCache", steps,
                            apply=diffusers_cache(SeaCacheConfig(threshold=threshold, max_consecutive_cached=0,
                                                                 raw_vision_callback=image_vision))))
    attention = ("transformer_blocks", "single_transformer_blocks")
    for skip in ((2,) if quick else (2, 3, 4)):
        found.append(Method(f"PAB attention every {skip}", "diffusers PAB", steps,
                            apply=diffusers_cache(PyramidAttentionBroadcastConfig(
                                spatial_attention_block_skip_range=skip, spatial_attention_timestep_skip_range=(-1, 901),
                                spatial_attention_block_identifiers=attention,
                                current_timestep_callback=lambda: STEP["timestep"]))))
    for skip, uncond in (((2, 3),) if quick else ((2, 2), (2, 5), (3, 5))):
        found.append(Method(f"FasterCache attention every {skip}, uncond every {uncond}", "diffusers FasterCache",
                            steps, image_layout=True, apply=faster_cache(FasterCacheConfig(
                                spatial_attention_block_skip_range=skip, spatial_attention_timestep_skip_range=(-1, 901),
                                unconditional_batch_skip_range=uncond, unconditional_batch_timestep_skip_range=(-1, 901),
                                spatial_attention_block_identifiers=tuple(f"{a}.*attn" for a in attention),
                                current_timestep_callback=lambda: STEP["timestep"], tensor_format="BCHW",
                                _unconditional_conditional_input_kwargs_identifiers=[
                                    "hidden_states", "encoder_hidden_states", "timestep"]))))
    for threshold in ((0.4,) if quick else (0.12, 0.2, 0.3, 0.45, 0.7, 1.0, 1.5)):
        for taylorseer in (False, True):
            found.append(Method(f"DBCache{'+TaylorSeer' if taylorseer else ''} t={threshold}",
                                f"cache-dit DBCache{' + TaylorSeer' if taylorseer else ''}", steps, own_copy=True,
                                apply=cache_dit(DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0,
                                                              residual_diff_threshold=threshold, max_warmup_steps=2,
                                                              num_inference_steps=steps),
                                                TaylorSeerCalibratorConfig(taylorseer_order=1) if taylorseer else None)))
    return found


class LinearWork:
    """Multiply-accumulates of every nn.Linear call while counting."""

    def __init__(self, transformer):
        self.macs = 0
        self.handles = [m.register_forward_hook(self._count) for m in transformer.modules()
                        if isinstance(m, torch.nn.Linear)]

    def _count(self, module, args, output):
        self.macs += args[0].numel() // module.in_features * module.in_features * module.out_features


STEP = {}   # where the loop is: read by the peers that take a timestep callback


def denoiser(transformer, wrapper=None):
    """velocity(x, sigma, context) through the transformer, or through an ImageLayout wrapper of it."""
    if wrapper is None:
        return lambda x, sigma, context: predict(transformer, x, sigma, context)
    return lambda x, sigma, context: wrapper(hidden_states=x, encoder_hidden_states=context,
                                             timestep=torch.full((x.shape[0],), sigma))


def generate(transformer, denoise, labels, seed, steps, cfg, sampler):
    """Model-space latents for labels [N, 3]: CFG as one batch a step, unconditional
    half first, as diffusers' pipelines do (FasterCache relies on that order)."""
    encoder = label_encoder()
    side = shapes.IMAGE_SIZE // codec.DOWNSCALE
    noise = torch.randn(labels.shape[0], codec.LATENT_CHANNELS, side, side, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        context = torch.cat([encoder(encoder.null_labels(labels.shape[0])), encoder(labels)])
        sigmas = simple_sigmas(steps).tolist()

        def velocity(x, index):
            sigma = sigmas[index]
            STEP.update(timestep=sigma * 1000)
            with transformer.cache_context("cfg", step_index=index, sigma=sigma, num_inference_steps=steps):
                uncond, cond = denoise(torch.cat([x, x]), sigma, context).chunk(2)
            return uncond + cfg * (cond - uncond)
        x = noise * sigmas[0]
        for index, (sigma, following) in enumerate(zip(sigmas, sigmas[1:])):
            d = velocity(x, index)
            if sampler == "heun" and following > 0:   # Heun's correction: the slope at the Euler point too
                d = (d + velocity(x + d * (following - sigma), index + 1)) / 2
            x = x + d * (following - sigma)
    return x


def start(transformer, method):
    """Apply method's cache: (the transformer it runs, denoise, remove)."""
    transformer = own_copy(transformer) if method.own_copy else transformer
    wrapper = ImageLayout(transformer) if method.image_layout else None
    remove = method.apply(wrapper or transformer, simple_sigmas(method.steps)) if method.apply else (lambda: None)
    return transformer, denoiser(transformer, wrapper), remove


def run(transformer, method, labels, seed, cfg):
    """(images, linear MACs) of one method's run; its cache is taken off after."""
    transformer, denoise, remove = start(transformer, method)
    work = LinearWork(transformer)
    try:
        x = generate(transformer, denoise, labels, seed, method.steps, cfg, method.sampler)
    finally:
        for handle in work.handles:
            handle.remove()
        remove()
    return codec.from_model_space(x), work.macs


def timed(transformer, method, labels, seed, cfg) -> float:
    transformer, denoise, remove = start(transformer, method)
    try:
        begin = time.perf_counter()
        generate(transformer, denoise, labels, seed, method.steps, cfg, method.sampler)
        return time.perf_counter() - begin
    finally:
        remove()


def peak_memory(transformer, method, labels, seed, cfg) -> int:
    """Peak bytes of CPU tensors allocated during one generation, beyond what
    was allocated before it (activations and whatever the cache holds), from
    torch's profiler: each op's own allocations and frees in time order, and
    the frees outside ops ("[memory]")."""
    from torch.profiler import ProfilerActivity, profile
    transformer, denoise, remove = start(transformer, method)
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
            generate(transformer, denoise, labels, seed, method.steps, cfg, method.sampler)
    finally:
        remove()
    live = peak = 0
    for event in sorted(profiler.events(), key=lambda e: e.time_range.start):
        live += event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def memory_rows(transformer, methods, labels, args) -> list:
    """Each method's peak_memory on the timing batch, and its ratio to the uncached run's (methods[0])."""
    rows = [{"method": m.name, "family": m.family, "peak_bytes": peak_memory(transformer, m, labels[:args.timing_batch],
                                                                             args.seed, args.cfg)} for m in methods]
    for row in rows:
        row["memory_ratio"] = row["peak_bytes"] / rows[0]["peak_bytes"]
    return rows


def measure(transformer, methods, labels, classifier, real_features, args) -> list:
    rows, images = [], {}
    for method in methods:
        out, macs = run(transformer, method, labels, args.seed, args.cfg)
        images[method.name] = out
        rows.append({"method": method.name, "family": method.family, "steps": method.steps,
                     "sampler": method.sampler, "macs": macs,
                     **{f"acc_{k}": v for k, v in accuracy(classifier.predict(out), labels).items()},
                     "fd": float(metrics.frechet_distance(classifier.features(out), real_features))})
    times = [[] for _ in methods]
    for _ in range(args.repeats):
        for i, method in enumerate(methods):
            times[i].append(timed(transformer, method, labels[:args.timing_batch], args.seed, args.cfg))
    reference = images[methods[0].name]
    for row, memory in zip(rows, memory_rows(transformer, methods, labels, args)):
        row.update(peak_bytes=memory["peak_bytes"], memory_ratio=memory["memory_ratio"])
    for row, seconds in zip(rows, times):
        row["seconds"] = statistics.median(seconds)
        row["wall_speedup"] = statistics.median(times[0]) / row["seconds"]
        row["work_speedup"] = rows[0]["macs"] / row["macs"]
        row["psnr"] = float(metrics.psnr(images[row["method"]], reference).clamp(max=100).mean())
        row["ssim"] = float(metrics.ssim(images[row["method"]], reference).mean())
    return rows


def memory_cell(row) -> str:
    return f"{row['peak_bytes'] / 2**20:.2f} MiB ({row['memory_ratio']:.2f}x)"


def memory_table(results: dict) -> str:
    lines = []
    for steps, rows in results.items():
        lines += [f"\n{steps} steps, peak memory of one generation:\n", "| method | peak memory |", "|---|---|"]
        lines += [f"| {row['method']} | {memory_cell(row)} |" for row in rows]
    return "\n".join(lines)


def table(results: dict) -> str:
    lines = []
    for steps, rows in results.items():
        lines += [f"\n{steps} steps:\n", "| method | work speedup | wall speedup | PSNR dB | SSIM | accuracy | FD | "
                  "peak memory |", "|---|---|---|---|---|---|---|---|"]
        for row in sorted(rows, key=lambda r: (r["work_speedup"], r["method"])):
            lines.append(f"| {row['method']} | {row['work_speedup']:.2f}x | {row['wall_speedup']:.2f}x | "
                         f"{row['psnr']:.2f} | {row['ssim']:.4f} | {row['acc_all']:.3f} | {row['fd']:.2f} | "
                         f"{memory_cell(row)} |")
    return "\n".join(lines)


GROUPS = {"ours": ("ours",), "peers": ("diffusers", "cache-dit"), "fewer steps": ("fewer steps",)}


def best_at(rows: list, speed: float, key: str, prefixes: tuple):
    """The highest-PSNR row of the families starting with `prefixes` whose `key` speedup is at least `speed`."""
    fast = [r for r in rows if r["family"].startswith(prefixes) and r[key] >= speed - 0.005]
    return max(fast, key=lambda r: r["psnr"], default=None)


def front_table(results: dict, speeds=(1.5, 2, 2.5, 3, 4, 5)) -> str:
    """Per step count and speed: the best PSNR each group reaches at that speedup or faster, by work and by wall."""
    lines = []
    for steps, rows in results.items():
        for key in ("work_speedup", "wall_speedup"):
            lines += [f"\n{steps} steps, best PSNR at >= the {key.replace('_', ' ')}:\n",
                      "| speedup | " + " | ".join(GROUPS) + " | ours - best peer |", "|---" * (len(GROUPS) + 2) + "|"]
            for speed in speeds:
                best = {group: best_at(rows, speed, key, prefixes) for group, prefixes in GROUPS.items()}
                cells = [f"{b['psnr']:.2f} dB ({b['method']}, {b[key]:.2f}x)" if b else "none" for b in best.values()]
                gap = (f"{best['ours']['psnr'] - best['peers']['psnr']:+.2f} dB" if best["ours"] and best["peers"]
                       else "n/a")
                lines.append(f"| {speed}x | " + " | ".join(cells) + f" | {gap} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for axis, (steps, rows) in zip(axes[0], results.items()):
        for family in sorted({r["family"] for r in rows} - {"uncached"}):
            points = sorted((r["wall_speedup"], min(r["psnr"], 60)) for r in rows if r["family"] == family)
            axis.plot(*zip(*points), marker="o", label=family)
        axis.set(title=f"reference model in diffusers, {steps} steps", xlabel="wall speedup (vs uncached)",
                 ylabel="PSNR vs uncached, dB")
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 50])
    parser.add_argument("--cfg", type=float, default=4.0)
    parser.add_argument("--timing-batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--exclude", help="leave out the methods whose name matches this regular expression")
    parser.add_argument("--only", help="run only the methods whose name matches this regular expression")
    parser.add_argument("--memory-only", action="store_true",
                        help="measure only each method's peak memory (no images, no timing): peers_memory.json")
    parser.add_argument("--plot", type=Path, help="write the PSNR / wall speedup fronts here")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "peers")
    args = parser.parse_args(argv)
    if args.quick:
        args.samples, args.steps, args.timing_batch, args.repeats = 4, [6], 4, 1
    import cache_dit
    import diffusers
    args.out.mkdir(parents=True, exist_ok=True)
    transformer = load_reference_transformer()
    classifier = load_classifier(WEIGHTS / "classifier.safetensors")
    generator = torch.Generator().manual_seed(args.seed)
    labels = shapes.random_labels(args.samples, generator)
    real_features = classifier.features(shapes.render(shapes.random_labels(args.samples, generator), generator))
    mag_ratios = {steps: calibrated_mag_ratios(transformer, steps, args.cfg, args.seed) for steps in args.steps}
    def kept(method):   # --exclude / --only never drop the uncached run every row is measured against
        return method.name == "uncached" or ((not args.exclude or not re.search(args.exclude, method.name))
                                             and (not args.only or re.search(args.only, method.name)))
    methods = {steps: list(filter(kept, methods_for(steps, args.quick, mag_ratios[steps]))) for steps in args.steps}
    report = {"diffusers": diffusers.__version__, "cache_dit": cache_dit.__version__, "torch": torch.__version__,
              "samples": args.samples, "cfg": args.cfg, "exclude": args.exclude, "only": args.only, "repeats": args.repeats,
              "timing_batch": args.timing_batch, "mag_ratios": mag_ratios}
    if args.memory_only:
        results = {steps: memory_rows(transformer, methods[steps], labels, args) for steps in args.steps}
        (args.out / "peers_memory.json").write_text(json.dumps({**report, "results": results}, indent=1))
        print(f"diffusers {diffusers.__version__}, cache-dit {cache_dit.__version__}, batch {args.timing_batch}, "
              f"cfg {args.cfg}" + memory_table(results))
        return
    results = {steps: measure(transformer, methods[steps], labels, classifier, real_features, args) for steps in args.steps}
    (args.out / "peers.json").write_text(json.dumps({**report, "results": results}, indent=1))
    if args.plot:
        plot(results, args.plot)
    print(f"diffusers {diffusers.__version__}, cache-dit {cache_dit.__version__}, {args.samples} samples, cfg {args.cfg}"
          + table(results) + "\n" + front_table(results))


if __name__ == "__main__":
    main()
