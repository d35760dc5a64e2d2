"""Wall clock on a GPU, in one call: a Flux.1-dev-sized model with random
weights, built on the GPU in bf16 and loaded through ComfyUI's own detection,
sampled at 1024x1024 (guidance-distilled, cfg 1, batch 1) uncached and with
the pack's caches and ComfyUI's EasyCache; per method the wall time (median
of --repeats after a warm-up, CUDA synchronised), the work speedup the run
counted, wall/work, peak GPU memory and cache bytes; then a torch profile of
DuCa N=5's conservative steps. Results: $OUT/gpu_bench.json, gpu_bench.md,
profile.txt.

On the lent machine (bench/gpu/README.md says how the bundle gets there):
    python3 bench/gpu/gpu_bench.py --comfyui .dtc/gpu_bundle/ComfyUI --out $OUT

Work is spent in priority order and anything that would pass --budget-s is
left out and listed as skipped, so one call fits the device's 10 minutes.
--mini runs the same code on the CPU with a tiny model and 2 steps (the CI
test, tests/test_gpu_bench.py), so the script cannot rot between machines."""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

MINI = dict(size="tiny", width=64, height=64, steps=(2,), repeats=1, text_tokens=16)
FULL = dict(size="full", width=1024, height=1024, steps=(28, 50), repeats=3, text_tokens=512)
FAST_ATTENTION = ("flash", "sage", "xformers")   # ComfyUI's other back-ends worth timing, where installed


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", type=Path, default=REPO / ".dtc" / "gpu_bundle" / "ComfyUI",
                        help="ComfyUI tree to import (the bundle's pruned copy, or the pinned checkout)")
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_bench.json, gpu_bench.md, profile.txt")
    parser.add_argument("--mini", action="store_true", help="CPU miniature: tiny model, 64x64, 2 steps, 1 repeat")
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop starting new work after this long")
    return parser.parse_args(argv)


def import_comfy(comfyui: Path, mini: bool):
    if not (comfyui / "comfy").is_dir():
        raise SystemExit(f"no ComfyUI at {comfyui}: run `python3 bench/gpu/make_bundle.py` (or pass --comfyui)")
    for path in (str(comfyui), str(REPO / "harness")):
        if path not in sys.path:
            sys.path.insert(0, path)
    from comfy.cli_args import args
    args.cpu = mini
    args.gpu_only = not mini   # weights built on the GPU stay there: no copy through host memory
    from pack_loader import import_pack
    import_pack()


class Clock:
    """Wall time of a callable with the device synchronised around it."""

    def __init__(self, device):
        import torch
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def __call__(self, work):
        self.sync()
        start = time.perf_counter()
        result = work()
        self.sync()
        return time.perf_counter() - start, result


def build_model(preset):
    """Random Flux.1-dev-layout weights on the compute device, loaded by ComfyUI's detection."""
    import comfy.model_management
    import comfy.sd
    import tiny_models
    device = comfy.model_management.get_torch_device()
    state_dict = tiny_models.build_state_dict("flux_dev", seed=0, size=preset["size"], device=str(device))
    model = comfy.sd.load_diffusion_model_state_dict(state_dict)
    del state_dict
    return model, device


def methods(default_config):
    """(label, kind, build) in priority order: what a short budget keeps first."""
    from comfy_extras.nodes_easycache import EasyCacheNode
    from dit_token_cache.accel_core.config import CacheConfig
    from dit_token_cache.nodes.patcher import apply_token_cache

    def ours(**settings):
        return lambda model: apply_token_cache(model, CacheConfig(**settings))

    def easycache(threshold):
        return lambda model: EasyCacheNode.execute(model, threshold, 0.15, 0.95, False).result[0]
    return [("uncached", "uncached", lambda model: model),
            ("DuCa N=5 reuse", "DuCa", ours(cycle_length=5, forecast="reuse")),
            ("DuCa default (node defaults)", "DuCa", lambda model: apply_token_cache(model, default_config)),
            ("FORA N=5", "FORA", ours(cycle_length=5, mode="fora", forecast="reuse")),
            ("ToCa N=5", "ToCa", ours(cycle_length=5, mode="toca", forecast="reuse")),
            ("DuCa N=3 reuse", "DuCa", ours(cycle_length=3, forecast="reuse")),
            ("DuCa N=8 reuse", "DuCa", ours(cycle_length=8, forecast="reuse")),
            ("DuCa N=1 (overhead)", "DuCa", ours(cycle_length=1)),
            ("EasyCache t=0.1", "EasyCache", easycache(0.1)),
            ("EasyCache t=0.3", "EasyCache", easycache(0.3))]


def with_attention(model, name):
    """A clone whose attention goes through ComfyUI's registered back-end `name`."""
    from comfy.ldm.modules.attention import get_attention_function
    function = get_attention_function(name)
    clone = model.clone()
    clone.model_options["transformer_options"]["optimized_attention_override"] = \
        lambda _default, *args, **kwargs: function(*args, **kwargs)
    return clone


def attention_backends(mini):
    from comfy.ldm.modules.attention import REGISTERED_ATTENTION_FUNCTIONS
    return ["pytorch"] + ([] if mini else [n for n in FAST_ATTENTION if n in REGISTERED_ATTENTION_FUNCTIONS])


class Bench:
    def __init__(self, args):
        import torch
        self.torch = torch
        self.args = args
        self.preset = MINI if args.mini else FULL
        self.start = time.perf_counter()
        self.model, self.device = build_model(self.preset)
        self.clock = Clock(self.device)
        self.build_s = time.perf_counter() - self.start
        import tiny_models
        self.positive, self.negative = tiny_models.conditioning("flux_dev", self.model, tokens=self.preset["text_tokens"])
        self.latent = tiny_models.empty_latent("flux_dev", self.preset["width"], self.preset["height"])["samples"]
        self.rows, self.skipped = [], []

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.start)

    def sample(self, model, steps):
        import comfy.sample
        noise = comfy.sample.prepare_noise(self.latent, 0)
        return comfy.sample.sample(model, noise, steps, 1.0, "euler", "simple", self.positive, self.negative,
                                   self.latent, seed=0, disable_pbar=True)

    def measure(self, label, kind, build, steps, attention, uncached_s=None):
        """One row: a warm-up run, then --repeats timed runs; None if the budget cannot hold it."""
        from dit_token_cache.nodes.patcher import SETTINGS_KEY
        model = build(with_attention(self.model, attention))
        expected = (uncached_s or 0) * (self.preset["repeats"] + 1)
        if uncached_s is not None and expected > self.left():
            self.skipped.append(f"{label}, {steps} steps, {attention}: about {expected:.0f} s, {self.left():.0f} s left")
            return None
        self.sample(model, steps)   # warm-up: kernels chosen, caches allocated, first-call costs paid
        if self.device.type == "cuda":
            self.torch.cuda.reset_peak_memory_stats()
        times = [self.clock(lambda: self.sample(model, steps))[0] for _ in range(self.preset["repeats"])]
        settings = model.model_options["transformer_options"].get(SETTINGS_KEY)
        run = settings.last_run if settings is not None else None
        row = dict(method=label, kind=kind, steps=steps, attention=attention, wall_s=statistics.median(times),
                   times_s=times, work_speedup=1.0 / run.stats.work_fraction if run else (1.0 if kind == "uncached" else None),
                   cache_bytes=run.stats.peak_cache_bytes if run else 0,
                   peak_gpu_bytes=self.torch.cuda.max_memory_allocated() if self.device.type == "cuda" else None,
                   summary=run.stats.headline(settings.name) if run else "")
        self.rows.append(row)
        return row

    def run(self):
        from dit_token_cache.accel_core.config import CacheConfig
        found = methods(CacheConfig())
        for steps in self.preset["steps"]:
            for attention in attention_backends(self.args.mini):
                base = self.measure("uncached", "uncached", found[0][2], steps, attention)
                for label, kind, build in found[1:] if attention == "pytorch" else found[1:2]:
                    self.measure(label, kind, build, steps, attention, base["wall_s"])
                for row in self.rows:
                    if row["steps"] == steps and row["attention"] == attention:
                        row["wall_speedup"] = base["wall_s"] / row["wall_s"]
                        row["wall_per_work"] = row["wall_speedup"] / row["work_speedup"] if row["work_speedup"] else None

    def profile(self, path: Path):
        """Where a conservative step's time goes: DuCa N=5 for one cycle under the torch profiler."""
        from dit_token_cache.accel_core.config import CacheConfig
        from dit_token_cache.nodes.patcher import apply_token_cache
        from torch.profiler import ProfilerActivity, profile
        if self.left() < 30:
            self.skipped.append("profile: no time left")
            return
        model = apply_token_cache(self.model, CacheConfig(cycle_length=5, forecast="reuse"))
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            self.sample(model, min(5, self.preset["steps"][0]))
        sort = "cuda_time_total" if self.device.type == "cuda" else "cpu_time_total"
        path.write_text(prof.key_averages().table(sort_by=sort, row_limit=40))


def markdown(report) -> str:
    lines = [f"{'CPU miniature of the ' if report['mini'] else ''}GPU benchmark on {report['device']}: Flux.1-dev-layout random weights ({report['parameters'] / 1e6:,.0f} M "
             f"parameters, {report['dtype']}), {report['width']}x{report['height']}, cfg 1, batch 1, euler; wall = "
             f"median of {report['repeats']} after a warm-up; model built in {report['build_s']:.0f} s.", "",
             "| steps | attention | method | wall s | wall speedup | work speedup | wall/work | cache MiB | peak GPU GiB |",
             "|---|---|---|---|---|---|---|---|---|"]

    def number(value, form):
        return form.format(value) if value is not None else "-"
    for row in report["rows"]:
        lines.append(f"| {row['steps']} | {row['attention']} | {row['method']} | {row['wall_s']:.2f} | "
                     f"{number(row.get('wall_speedup'), '{:.2f}x')} | {number(row['work_speedup'], '{:.2f}x')} | "
                     f"{number(row.get('wall_per_work'), '{:.2f}')} | {row['cache_bytes'] / 2**20:.1f} | "
                     f"{number(row['peak_gpu_bytes'] and row['peak_gpu_bytes'] / 2**30, '{:.1f}')} |")
    if report["skipped"]:
        lines += ["", "Skipped for time: " + "; ".join(report["skipped"])]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    import_comfy(args.comfyui, args.mini)
    import torch
    args.out.mkdir(parents=True, exist_ok=True)
    bench = Bench(args)
    bench.run()
    bench.profile(args.out / "profile.txt")
    preset = bench.preset
    report = dict(device=torch.cuda.get_device_name() if bench.device.type == "cuda" else "cpu",
                  torch=torch.__version__, mini=args.mini, dtype=str(bench.model.model.get_dtype_inference()),
                  parameters=sum(p.numel() for p in bench.model.model.diffusion_model.parameters()),
                  width=preset["width"], height=preset["height"], repeats=preset["repeats"], build_s=bench.build_s,
                  total_s=time.perf_counter() - bench.start, rows=bench.rows, skipped=bench.skipped,
                  modules=sorted({name.split(".")[0] for name in sys.modules}))
    (args.out / "gpu_bench.json").write_text(json.dumps(report, indent=1))
    (args.out / "gpu_bench.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
