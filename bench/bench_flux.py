"""Flux-architecture benchmark: uncached vs DuCa / ToCa / FORA vs ComfyUI's own
EasyCache, all in one process on one random-weight model, through ComfyUI's
real sampling path (nodes.common_ksampler).

Reports wall-clock speedup (median of --repeats runs, each against the
uncached median), theoretical speedup from our work accounting, their ratio,
relative L2 of the final latent against uncached, and peak memory.

    make bench                    # full table (about 10 minutes on 2 CPU cores)
    python bench/bench_flux.py --quick
"""
import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "harness"))
import tiny_models  # noqa: E402

COMFYUI = tiny_models.ensure_comfy()

import nodes  # noqa: E402
from comfy_extras.nodes_easycache import EasyCacheNode  # noqa: E402

from pack_loader import import_pack  # noqa: E402
from skipped_steps import SkippedStepsLog  # noqa: E402

pack = import_pack()
CacheConfig = pack.accel_core.CacheConfig
apply_token_cache = pack.nodes.patcher.apply_token_cache
SETTINGS_KEY = pack.nodes.patcher.SETTINGS_KEY

FAMILY = "flux_dev"


class PeakRSS:
    """Peak resident memory of this process while a run is under way."""

    def __init__(self):
        self.process = psutil.Process()

    def __enter__(self):
        self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.02)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


def run_once(model, args, positive, negative, latent):
    start = time.perf_counter()
    with PeakRSS() as memory:
        (out,) = nodes.common_ksampler(model, args.seed, args.steps, 1.0, "euler", "simple", positive, negative, latent)
    return time.perf_counter() - start, out["samples"], memory.peak


def run_stats(patched, spec, easycache_log) -> dict:
    """Work accounting of the run just finished: ours, or EasyCache's skipped steps."""
    settings = patched.model_options["transformer_options"].get(SETTINGS_KEY) if spec is not None else None
    if settings is not None:
        stats = settings.last_run.stats
        return dict(theoretical=stats.theoretical_speedup, work_fraction=stats.work_fraction,
                    cache_mib=stats.peak_cache_bytes / 2**20, **stats.counts())
    if isinstance(spec, tuple) and easycache_log.skipped:
        skipped, total = easycache_log.skipped
        return dict(theoretical=total / (total - skipped), full=total - skipped, aggressive=skipped, conservative=0)
    return {}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--size", type=int, default=768, help="image side in pixels (latent /8, patches /2)")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--double", type=int, default=2)
    parser.add_argument("--single", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="small model, few steps, 1 repeat: a smoke run")
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.size, args.hidden, args.double, args.single, args.repeats = 8, 128, 256, 2, 2, 1

    torch.manual_seed(0)
    path = tiny_models.build_checkpoint(FAMILY, REPO / ".dtc" / "models" / f"flux_bench_{args.hidden}_{args.double}_{args.single}.safetensors",
                                        size="bench", hidden_size=args.hidden, depth=args.double,
                                        depth_single_blocks=args.single, dtype="float32")
    model = tiny_models.load(FAMILY, path)
    positive, negative = tiny_models.conditioning(FAMILY, model, tokens=64)
    latent = tiny_models.empty_latent(FAMILY, args.size, args.size)

    variants = [("uncached", None)]
    variants += [(f"DuCa N={n} r=0.9", CacheConfig(cycle_length=n, cache_ratio=0.9)) for n in (1, 3, 5, 8)]
    variants += [("ToCa N=5 r=0.9", CacheConfig(cycle_length=5, cache_ratio=0.9, mode="toca")),
                 ("FORA N=5", CacheConfig(cycle_length=5, mode="fora"))]
    variants += [(f"EasyCache t={t}", ("easycache", t)) for t in (0.5, 1.5, 3.0)]

    def build(spec):
        if spec is None:
            return model
        if isinstance(spec, tuple):
            return EasyCacheNode.execute(model, spec[1], 0.15, 0.95, False).result[0]
        return apply_token_cache(model, spec)

    easycache_log = SkippedStepsLog().install()
    rows = []
    nodes.common_ksampler(model, args.seed, 2, 1.0, "euler", "simple", positive, negative, latent)  # warm-up
    patched = {name: build(spec) for name, spec in variants}
    times = {name: [] for name, _ in variants}
    peaks = {name: [] for name, _ in variants}
    outputs, stats_rows = {}, {}
    # Round-robin over the variants, so slow drift of the machine hits every variant alike.
    for _ in range(args.repeats):
        for name, spec in variants:
            seconds, outputs[name], peak = run_once(patched[name], args, positive, negative, latent)
            times[name].append(seconds)
            peaks[name].append(peak)
            stats_rows[name] = run_stats(patched[name], spec, easycache_log)
    uncached_seconds = statistics.median(times["uncached"])
    for name, _ in variants:
        row = {"variant": name, "seconds": statistics.median(times[name]), "peak_rss_mib": max(peaks[name]) / 2**20}
        row["wall_speedup"] = uncached_seconds / row["seconds"]
        row["rel_l2"] = float((outputs[name] - outputs["uncached"]).norm() / outputs["uncached"].norm())
        row.update(stats_rows[name])
        if "theoretical" in row:
            row["wall_over_theoretical"] = row["wall_speedup"] / row["theoretical"]
        rows.append(row)
        print(json.dumps(row), flush=True)

    tokens = (args.size // 16) ** 2
    print(f"\nFlux-architecture random weights: hidden {args.hidden}, {args.double} double + {args.single} single blocks, "
          f"{args.size}x{args.size} ({tokens} image + 64 text tokens), {args.steps} euler steps, cfg 1, "
          f"{torch.get_num_threads()} CPU threads, median of {args.repeats}\n")
    print("| variant | wall s | wall speedup | theoretical | wall/theoretical | rel L2 vs uncached | steps F/A/C | cache MiB | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        theo = f"{r['theoretical']:.2f}x" if "theoretical" in r else "-"
        ratio = f"{r['wall_over_theoretical']:.2f}" if "theoretical" in r else "-"
        kinds = f"{r['full']}/{r['aggressive']}/{r['conservative']}" if "full" in r else "-"
        cache = f"{r['cache_mib']:.1f}" if "cache_mib" in r else "-"
        print(f"| {r['variant']} | {r['seconds']:.2f} | {r['wall_speedup']:.2f}x | {theo} | {ratio} | {r['rel_l2']:.4f} | {kinds} | {cache} | {r['peak_rss_mib']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
