"""Every caching method on the project's trained reference model, one process,
same seeds: quality against the uncached run (PSNR, SSIM, relative L2),
against the data (classifier accuracy, Fréchet distance on classifier
features), and speed (wall clock, median of 3, and theoretical from work
accounting). Writes a Markdown report, a Pareto plot and an image grid.

    python bench/bench_reference.py                # full run (about 25 min on 2 cores)
    python bench/bench_reference.py --quick        # a couple of settings, few samples (CI)
    python bench/bench_reference.py --fronts 20 28 50   # every cache against fewer steps (bench/fronts.py)
"""
import argparse
import json
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "harness"))
import tiny_models  # noqa: E402

tiny_models.ensure_comfy()

import comfy.patcher_extension  # noqa: E402
import comfy.sd  # noqa: E402
import nodes  # noqa: E402
from comfy_extras.nodes_easycache import EasyCacheNode, LazyCacheNode  # noqa: E402

from pack_loader import import_pack  # noqa: E402
from skipped_steps import SkippedStepsLog  # noqa: E402
from reference import codec, shapes  # noqa: E402
from reference.classifier import accuracy, load_classifier  # noqa: E402
from reference.model import MODEL_FILE, PREDICTOR_DIR, PREDICTOR_FILE, WEIGHTS, conditioning  # noqa: E402

pack = import_pack()
from dit_token_cache.accel_core import metrics  # noqa: E402
from dit_token_cache.accel_core.lora import linear_layers  # noqa: E402
from dit_token_cache.accel_core.predictor_file import load_lora, load_predictor  # noqa: E402
from dit_token_cache.nodes.families import adapter_for  # noqa: E402
from dit_token_cache.nodes.tokencache_nodes import step_importance  # noqa: E402
CacheConfig = pack.accel_core.CacheConfig
patcher = pack.nodes.patcher
StepKind = pack.accel_core.StepKind


@dataclass
class Method:
    name: str
    family: str                 # Pareto front it belongs to
    build: object               # model -> patched model
    steps: int
    sampler: str = "euler"


def ours(config):
    return lambda model: patcher.apply_token_cache(model, config)


PREDICTORS = {"learned": PREDICTOR_FILE,   # first_block, chained objective (the node's defaults)
              "mlp_mixer": PREDICTOR_DIR / "shapes_reference_mlp_mixer.safetensors",
              "mlp_mixer first_order": PREDICTOR_DIR / "shapes_reference_mlp_mixer_first_order.safetensors",
              # first_block, p_step objective (issue 12: trained against what a P-step recomputes)
              "learned p_step": PREDICTOR_DIR / "shapes_reference_predictor_p_step.safetensors"}


# the shipped first-block predictor with LoRA adapters on the last 2 blocks (scripts/train_predictor.py --from-predictor)
LORA_FILE = PREDICTOR_DIR / "shapes_reference_predictor_lora.safetensors"


def tokencache(scoring, cache_ratio=0.9, i_steps=4, protected_last_blocks=2, placement="measured", forecast="reuse",
               lora=False):
    """TokenCache with one of the shipped predictors (PREDICTORS), or the
    training-free fallback ("change"), or random scores ("random"). I-steps
    from the shipped first-block predictor's calibration by `placement`
    (so scorings compare at the same I-steps), or "even". lora: with the
    LoRA adapters of LORA_FILE, whatever the scoring."""
    config = CacheConfig(mode="tokencache", cache_ratio=cache_ratio, i_steps=i_steps,
                         protected_last_blocks=protected_last_blocks, forecast=forecast)

    def build(model):
        parts = adapter_for(model).predictor_parts
        shipped, metadata = load_predictor(str(PREDICTOR_FILE), first_block=parts)
        calibration = step_importance(metadata["calibration"], placement)
        adapters = None
        if lora:
            adapter = adapter_for(model)
            adapters = load_lora(str(LORA_FILE), lambda: linear_layers(adapter.block_paths()), adapter.block_count)
        if scoring in PREDICTORS:
            predictor = shipped if PREDICTORS[scoring] == PREDICTOR_FILE else \
                load_predictor(str(PREDICTORS[scoring]), first_block=parts)[0]
            return patcher.apply_token_cache(model, config, predictor=predictor, calibration=calibration, lora=adapters)
        return patcher.apply_token_cache(model, config, fallback=scoring, calibration=calibration, lora=adapters)
    return build


def methods_for(args) -> list:
    steps = args.steps
    plain = lambda model: model  # noqa: E731
    if args.quick:
        return [Method("uncached", "uncached", plain, steps),
                Method("DuCa N=3 r=0.9", "DuCa", ours(CacheConfig(cycle_length=3)), steps),
                Method("TokenCache learned I=3 r=0.9", "TokenCache", tokencache("learned", i_steps=3), steps)]
    found = [Method("uncached", "uncached", plain, steps)]
    settings = [("DuCa", dict(cycle_length=n)) for n in (3, 5, 8)] + [("DuCa", dict(cycle_length=5, cache_ratio=0.7))]
    settings += [("ToCa", dict(cycle_length=n, mode="toca")) for n in (3, 5)] + [("ToCa", dict(cycle_length=5, cache_ratio=0.7, mode="toca"))]
    settings += [("FORA", dict(cycle_length=n, mode="fora")) for n in (2, 3, 5)]
    for family, kw in settings:
        config = CacheConfig(**kw)
        ratio = "" if family == "FORA" else f" r={config.cache_ratio}"
        found.append(Method(f"{family} N={config.cycle_length}{ratio}", family, ours(config), steps))
    for selector in ("v_norm", "k_norm", "similarity", "attention"):
        config = CacheConfig(cycle_length=5, selector=selector)
        found.append(Method(f"DuCa N=5 r=0.9 {selector}", "DuCa selectors", ours(config), steps))
    found.append(Method("DuCa N=5 r=0.9 conservative-first", "DuCa order", ours(CacheConfig(cycle_length=5, aggressive_first=False)), steps))
    for i_steps, ratio in ((6, 0.9), (4, 0.9), (3, 0.9), (4, 0.8)):
        found.append(Method(f"TokenCache learned I={i_steps} r={ratio}", "TokenCache",
                            tokencache("learned", ratio, i_steps), steps))
    for scoring in ("mlp_mixer", "mlp_mixer first_order", "learned p_step", "change", "random"):
        found.append(Method(f"TokenCache {scoring} I=4 r=0.9", "TokenCache scoring", tokencache(scoring), steps))
    for scoring in ("learned", "change", "random"):   # issue 12: the LoRA refinement of the last 2 blocks
        found.append(Method(f"TokenCache {scoring}+LoRA I=4 r=0.9", "TokenCache LoRA",
                            tokencache(scoring, lora=True), steps))
    for placement in ("predicted", "even"):
        found.append(Method(f"TokenCache learned I=4 r=0.9 {placement} I-steps", "TokenCache placement",
                            tokencache("learned", placement=placement), steps))
    found.append(Method("TokenCache change I=4 r=0.9 even I-steps", "TokenCache placement",
                        tokencache("change", placement="even"), steps))
    for precision in ("model", "bf16", "fp8"):   # issue 11: the cost of storing the cache narrower
        for name, kw in (("DuCa N=5 r=0.9 linear", dict(cycle_length=5, forecast="linear")),
                         ("FORA N=5 linear", dict(cycle_length=5, forecast="linear", mode="fora"))):
            found.append(Method(f"{name} precision={precision}", "cache precision",
                                ours(CacheConfig(cache_precision=precision, **kw)), steps))
    for budget in (0.134, 0.066, 0.033):   # a half, a quarter, an eighth of the 0.27 GiB bf16 cache of 64 images
        found.append(Method(f"DuCa N=5 r=0.9 linear precision=bf16 budget={budget}GiB", "cache precision",
                            ours(CacheConfig(cycle_length=5, forecast="linear", cache_precision="bf16",
                                             cache_budget_gb=budget)), steps))
    for t in (0.1, 0.3):
        found.append(Method(f"EasyCache t={t}", "EasyCache", lambda m, t=t: EasyCacheNode.execute(m, t, 0.15, 0.95, False).result[0], steps))
    found.append(Method("LazyCache t=0.3", "LazyCache", lambda m: LazyCacheNode.execute(m, 0.3, 0.15, 0.95, False).result[0], steps))
    for divisor in (2, 3, 4):
        found.append(Method(f"{steps // divisor} steps", "fewer steps", plain, steps // divisor))
        found.append(Method(f"{steps // divisor} dpmpp_2m steps", "fewer steps dpmpp_2m", plain, steps // divisor,
                            "dpmpp_2m"))
    if args.only:
        found = [m for m in found if m.name == "uncached" or re.match(args.only, m.name)]
    return found


def merged(earlier: dict, rows: list):
    """An --only run's rows in place of the same methods' rows of an earlier
    full run (same model, seeds and settings; each wall speedup is against the
    uncached run of its own process), so the report and plots cover every
    method. Returns (rows, the earlier run's step errors)."""
    fresh = {row["method"]: row for row in rows}
    kept = [fresh.pop(row["method"], row) for row in earlier["rows"]]
    return kept + list(fresh.values()), earlier.get("step_errors", {})


def generate(model, labels, seed, steps, cfg, batch, sampler="euler", scheduler="simple"):
    """Images [N, 3, 64, 64] for labels [N, 3], in batches; batch b uses seed + b."""
    images = []
    for b, start in enumerate(range(0, labels.shape[0], batch)):
        chunk = labels[start:start + batch]
        positive, negative = conditioning(chunk)
        side = shapes.IMAGE_SIZE // codec.DOWNSCALE
        latent = {"samples": torch.zeros(chunk.shape[0], codec.LATENT_CHANNELS, side, side)}
        (out,) = nodes.common_ksampler(model, seed + b, steps, cfg, sampler, scheduler, positive, negative, latent)
        images.append(codec.decode(out["samples"].float()))
    return torch.cat(images)


def run_stats(patched, method, skips, full_steps):
    """Theoretical speedup of the run just finished: our work accounting,
    EasyCache/LazyCache's skipped steps, or the step count ratio."""
    settings = patched.model_options["transformer_options"].get(patcher.SETTINGS_KEY)
    if settings is not None and settings.last_run is not None:
        s = settings.last_run.stats
        return {"theoretical": s.theoretical_speedup, "work_fraction": s.work_fraction, **s.counts()}
    if method.family in ("EasyCache", "LazyCache"):
        skipped, total = skips.skipped
        return {"theoretical": total / (total - skipped), "skipped": skipped}
    return {"theoretical": full_steps / method.steps}


def step_error_probe(records):
    """APPLY_MODEL wrapper: each evaluation is computed twice, in full and
    with the cache, and the relative error of the cached output is recorded
    with the step's kind and its distance from the last full step."""
    def probe(executor, x, t, *args, **kwargs):
        *rest, options = args
        full = executor(x, t, *rest, {k: v for k, v in options.items() if k != patcher.RUN_KEY}, **kwargs)
        cached = executor(x, t, *rest, options, **kwargs)
        run = options.get(patcher.RUN_KEY)
        if run is not None:
            step = run.schedule.step_of(float(t.flatten()[0]))
            kind = run.stats.step_kinds.get(step)
            since_full = next(d for d in range(step + 1) if run.schedule.kinds[step - d] is StepKind.FULL)
            records.append({"step": step, "kind": kind.value, "since_full": since_full,
                            "error": float(metrics.relative_l2(cached, full))})
        return cached
    return probe


def measure_step_errors(model, labels, args):
    """Claim: right after a full step, aggressive and conservative steps err about
    equally; later they diverge. Long FORA and ToCa cycles give both kinds at
    every distance from the full step."""
    results = {}
    for mode in ("fora", "toca"):
        records = []
        patched = patcher.apply_token_cache(model, CacheConfig(cycle_length=args.steps, mode=mode))
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "dtc_step_error", step_error_probe(records))
        generate(patched, labels, args.seed, args.steps, args.cfg, args.batch)
        results[mode] = records
    return results


def build_front_method(method, model):
    """The model a fronts.FrontMethod samples with."""
    if method.kind == "plain":
        return model
    if method.kind == "ours":
        return patcher.apply_token_cache(model, CacheConfig(**method.config))
    if method.kind == "tokencache":
        return tokencache("learned", **method.config)(model)
    node = EasyCacheNode if method.kind == "easycache" else LazyCacheNode
    return node.execute(model, method.extra["threshold"], 0.15, 0.95, False).result[0]


def measure_front(model, methods, labels, classifier, real_features, args, skips):
    """Rows of one step count: quality of every method against the first
    (uncached), and wall clock timed round-robin, median of args.repeats."""
    rows, outputs, patched_models = [], {}, []
    for method in methods:
        patched = build_front_method(method, model)
        skips.skipped = None
        images = generate(patched, labels, args.seed, method.steps, args.cfg, args.batch, method.sampler)
        outputs[method.name] = images
        row = {"method": method.name, "family": method.family, "kind": method.kind, "steps": method.steps,
               "sampler": method.sampler, **run_stats(patched, method, skips, methods[0].steps)}
        settings = patched.model_options["transformer_options"].get(patcher.SETTINGS_KEY)
        if settings is not None and settings.last_run is not None and settings.last_run.stats.step_errors:
            errors = list(settings.last_run.stats.step_errors.values())
            row["measured_error"] = sum(errors) / len(errors)
        row.update({f"acc_{k}": v for k, v in accuracy(classifier.predict(images), labels).items()})
        row["fd"] = float(metrics.frechet_distance(classifier.features(images), real_features))
        rows.append(row)
        patched_models.append(patched)
        print(json.dumps(row), flush=True)
    times = [[] for _ in methods]
    timing_labels = labels[:args.timing_batch]
    for _ in range(args.repeats):
        for i, (method, patched) in enumerate(zip(methods, patched_models)):
            start = time.perf_counter()
            generate(patched, timing_labels, args.seed, method.steps, args.cfg, args.timing_batch, method.sampler)
            times[i].append(time.perf_counter() - start)
    reference = outputs[methods[0].name]
    for row, seconds in zip(rows, times):
        row["seconds"] = statistics.median(seconds)
        row["wall_speedup"] = statistics.median(times[0]) / row["seconds"]
        images = outputs[row["method"]]
        row["psnr"] = float(metrics.psnr(images, reference).mean())
        row["ssim"] = float(metrics.ssim(images, reference).mean())
    return rows


def run_fronts(args, model, classifier, labels, real_features, skips):
    import fronts
    from dit_token_cache.nodes.duca_node import DEFAULT_FORECAST
    path = args.out / "fronts.json"
    earlier = json.loads(path.read_text()) if args.only and path.exists() else {}
    results = {}
    for steps in args.fronts:
        methods = fronts.front_methods(steps, args.quick, FRONT_MAX_ERRORS)
        if args.only:
            methods = [m for m in methods if m.name == "uncached" or re.match(args.only, m.name)]
        rows = measure_front(model, methods, labels, classifier, real_features, args, skips)
        if str(steps) in earlier:   # same model, seeds and settings; each wall speedup against its own process's uncached
            rows = merged({"rows": earlier[str(steps)]}, rows)[0]
        results[steps] = rows
        path.write_text(json.dumps({**earlier, **{str(k): v for k, v in results.items()}}, indent=1))
    print(fronts.write(results, args, f"DuCa N=5 {DEFAULT_FORECAST}"))


# (forecast, max_error) of the error-aware rows: thresholds around the errors the
# fixed N=5 cycle measures on this model
FRONT_MAX_ERRORS = (("linear", 0.05), ("linear", 0.1), ("linear", 0.2))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=4.0)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--timing-batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", help="run uncached and the methods whose name matches this regular expression "
                                       "from its start (with --fronts too); their rows join the earlier run's results")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "reference")
    parser.add_argument("--fronts", type=int, nargs="+", metavar="STEPS",
                        help="instead: the pack's caches against fewer steps at these step counts (bench/fronts.py)")
    args = parser.parse_args()
    if args.quick:
        args.samples, args.steps, args.batch, args.timing_batch, args.repeats = 16, 8, 16, 4, 1
    elif args.fronts:   # three step counts and about 45 methods each: fewer samples to fit an hour on 2 cores
        args.samples, args.batch, args.timing_batch = min(args.samples, 32), 32, 16
    args.out.mkdir(parents=True, exist_ok=True)

    skips = SkippedStepsLog().install()
    model = comfy.sd.load_diffusion_model(str(MODEL_FILE))
    classifier = load_classifier(WEIGHTS / "classifier.safetensors")
    generator = torch.Generator().manual_seed(args.seed)
    labels = shapes.random_labels(args.samples, generator)
    real_images = shapes.render(shapes.random_labels(args.samples, generator), generator)
    real_features = classifier.features(real_images)
    timing_labels = labels[:args.timing_batch]
    if args.fronts:
        run_fronts(args, model, classifier, labels, real_features, skips)
        return

    rows, outputs = [], {}
    methods = methods_for(args)
    for method in methods:
        patched = method.build(model)
        skips.skipped = None
        images = generate(patched, labels, args.seed, method.steps, args.cfg, args.batch, method.sampler)
        outputs[method.name] = images
        row = {"method": method.name, "family": method.family, "steps": method.steps,
               **run_stats(patched, method, skips, args.steps)}
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            generate(patched, timing_labels, args.seed, method.steps, args.cfg, args.timing_batch, method.sampler)
            times.append(time.perf_counter() - start)
        row["seconds"] = statistics.median(times)
        predicted = classifier.predict(images)
        row.update({f"acc_{k}": v for k, v in accuracy(predicted, labels).items()})
        row["fd"] = float(metrics.frechet_distance(classifier.features(images), real_features))
        rows.append(row)
        print(json.dumps(row), flush=True)

    reference = outputs["uncached"]
    base_seconds = rows[0]["seconds"]
    for row in rows:
        images = outputs[row["method"]]
        row["wall_speedup"] = base_seconds / row["seconds"]
        row["psnr"] = float(metrics.psnr(images, reference).mean())
        row["ssim"] = float(metrics.ssim(images, reference).mean())
        row["rel_l2"] = float(metrics.relative_l2(images, reference))

    step_errors = measure_step_errors(model, labels[:args.batch], args) if not args.only else {}
    results = args.out / "results.json"
    if args.only and results.exists():
        rows, step_errors = merged(json.loads(results.read_text()), rows)
    results.write_text(json.dumps({"rows": rows, "step_errors": step_errors, "args": {
        k: str(v) for k, v in vars(args).items()}}, indent=1))
    import report
    report.write(rows, step_errors, outputs, labels, args)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
