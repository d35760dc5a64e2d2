"""Speed against quality at 20, 28 and 50 steps: every cache of the pack, with
and without forecasting and the error-aware schedule, next to simply sampling
fewer steps with euler, dpmpp_2m and uni_pc (issue 10). Run by
`python bench/bench_reference.py --fronts` in the reference benchmark's
process; this module lays out the methods and reports the fronts."""
import math
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

FEWER_STEP_SAMPLERS = ("euler", "dpmpp_2m", "uni_pc")
FORECASTS = ("reuse", "linear", "quadratic")
TARGET_BAND = (3.0, 5.0)      # wall speedups where the target is judged
TARGET_MARGIN_DB = 1.0


@dataclass
class FrontMethod:
    name: str
    family: str               # the front it is drawn in
    config: dict = None       # CacheConfig settings, for the pack's own caches
    steps: int = 0
    sampler: str = "euler"
    kind: str = "ours"        # ours, plain (uncached / fewer steps), tokencache, easycache, lazycache
    extra: dict = field(default_factory=dict)


def front_methods(steps: int, quick: bool, max_errors) -> list:
    """What one step count compares: the pack's modes at several cycle lengths
    and forecasts, the error-aware schedule, TokenCache, ComfyUI's caches, and
    fewer steps with three samplers at every count from steps / 2 down."""
    found = [FrontMethod("uncached", "uncached", steps=steps, kind="plain")]
    cycles = {"fora": (2, 3, 5, 8), "duca": (2, 3, 5, 8), "toca": (2, 3, 5, 8)}
    if quick:
        cycles = {"fora": (3,), "duca": (3,)}
    for mode, lengths in cycles.items():
        label = {"fora": "FORA", "duca": "DuCa", "toca": "ToCa"}[mode]
        forecasts = FORECASTS if not quick else ("reuse", "linear")
        for n in lengths:
            for forecast in forecasts:
                name = f"{label} N={n} {forecast}"
                found.append(FrontMethod(name, f"{label} {forecast}", dict(mode=mode, cycle_length=n, forecast=forecast),
                                         steps))
    for forecast, max_error in max_errors[:1] if quick else max_errors:
        found.append(FrontMethod(f"DuCa N=5 {forecast} max_error={max_error}", "DuCa error-aware",
                                 dict(cycle_length=5, forecast=forecast, max_error=max_error), steps))
    if not quick:
        for forecast in ("reuse", "linear"):
            found.append(FrontMethod(f"TokenCache learned I=4 {forecast}", "TokenCache", dict(forecast=forecast),
                                     steps, kind="tokencache"))
        found.append(FrontMethod("EasyCache t=0.1", "EasyCache", steps=steps, kind="easycache", extra={"threshold": 0.1}))
        found.append(FrontMethod("LazyCache t=0.3", "LazyCache", steps=steps, kind="lazycache", extra={"threshold": 0.3}))
    counts = sorted({max(2, round(steps / k)) for k in (2, 3, 4, 5, 6)}, reverse=True)
    if quick:
        counts = counts[:2]
    for sampler in FEWER_STEP_SAMPLERS if not quick else ("euler", "dpmpp_2m"):
        for count in counts:
            found.append(FrontMethod(f"{count} {sampler} steps", f"fewer steps {sampler}", steps=count,
                                     sampler=sampler, kind="plain"))
    return found


# -- report --------------------------------------------------------------------------

def _upper_envelope(points):
    """Points (x, y) not dominated by another with x and y both at least as large."""
    points = sorted(points, key=lambda p: (-p[0], -p[1]))
    kept, best = [], -math.inf
    for x, y in points:
        if y > best:
            kept.append((x, y))
            best = y
    return sorted(kept)


def _at(envelope, x):
    """PSNR of an envelope at speedup x: linear between its points; None outside them."""
    for (x0, y0), (x1, y1) in zip(envelope, envelope[1:]):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else max(y0, y1)
    if envelope and abs(envelope[0][0] - x) < 1e-9:
        return envelope[0][1]
    return None


def fewer_steps_envelope(rows):
    return _upper_envelope([(r["wall_speedup"], r["psnr"]) for r in rows if r["family"].startswith("fewer steps")])


def ours(rows):
    return [r for r in rows if r["kind"] in ("ours", "tokencache")]


def target_verdict(rows):
    """The pack's best setting with wall speedup in TARGET_BAND against the best
    fewer-steps sampler at the same wall speedup."""
    fewer = fewer_steps_envelope(rows)
    best = None
    for r in ours(rows):
        if not TARGET_BAND[0] <= r["wall_speedup"] <= TARGET_BAND[1]:
            continue
        baseline = _at(fewer, r["wall_speedup"])
        if baseline is None:
            continue
        gap = r["psnr"] - baseline
        if best is None or gap > best[1]:
            best = (r, gap, baseline)
    if best is None:
        return None, "no setting of the pack lies between 3x and 5x wall speedup inside the fewer-steps front"
    r, gap, baseline = best
    reached = "reached" if gap >= TARGET_MARGIN_DB else "not reached"
    return gap, (f"{reached}: best of the pack in {TARGET_BAND[0]:g}-{TARGET_BAND[1]:g}x is {r['method']} "
                 f"({r['psnr']:.2f} dB at {r['wall_speedup']:.2f}x wall), fewer steps give {baseline:.2f} dB at that "
                 f"speedup: {gap:+.2f} dB (target +{TARGET_MARGIN_DB:g} dB)")


def default_on_front(rows, default_name):
    """Whether the node's default setting is on the pack's own front (no
    setting of the pack is both faster and better by more than noise)."""
    default = next((r for r in rows if r["method"] == default_name), None)
    if default is None:
        return f"{default_name} was not measured"
    better = [r for r in ours(rows) if r is not default and r["wall_speedup"] >= default["wall_speedup"]
              and r["psnr"] > default["psnr"] + 0.1]
    if not better:
        return f"on the front: no setting of the pack is faster and better than {default_name}"
    top = max(better, key=lambda r: r["psnr"])
    return (f"off the front: {top['method']} is faster ({top['wall_speedup']:.2f}x against "
            f"{default['wall_speedup']:.2f}x) and better ({top['psnr']:.2f} against {default['psnr']:.2f} dB)")


def table(rows) -> str:
    lines = ["| method | steps | sampler | theoretical | wall speedup | PSNR dB | SSIM | class acc | FD | full/agg/cons | measured error |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["family"], -r["wall_speedup"])):
        psnr = "∞" if math.isinf(r["psnr"]) else f"{r['psnr']:.2f}"
        kinds = f"{r['full']}/{r['aggressive']}/{r['conservative']}" if "full" in r else "-"
        error = f"{r['measured_error']:.3f}" if r.get("measured_error") is not None else "-"
        lines.append(f"| {r['method']} | {r['steps']} | {r['sampler']} | {r['theoretical']:.2f}x | "
                     f"{r['wall_speedup']:.2f}x | {psnr} | {r['ssim']:.3f} | {r['acc_all']:.3f} | {r['fd']:.0f} | "
                     f"{kinds} | {error} |")
    return "\n".join(lines)


def forecast_summary(rows) -> str:
    """PSNR by forecast for each mode and cycle length: the evidence for the default."""
    lines = ["| setting | reuse | linear | quadratic |", "|---|---|---|---|"]
    named = {r["method"]: r for r in rows}
    for label in ("FORA", "DuCa", "ToCa"):
        for n in (2, 3, 5, 8):
            cells = [named.get(f"{label} N={n} {f}") for f in FORECASTS]
            if not any(cells):
                continue
            lines.append(f"| {label} N={n} | " + " | ".join(f"{c['psnr']:.2f} dB" if c else "-" for c in cells) + " |")
    return "\n".join(lines)


def plot(rows, path: Path, steps: int):
    families = sorted({r["family"] for r in rows if r["family"] != "uncached"})
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for i, family in enumerate(families):
        points = sorted((r["wall_speedup"], r["psnr"]) for r in rows if r["family"] == family and math.isfinite(r["psnr"]))
        if not points:
            continue
        dashed = family.startswith("fewer steps")
        ax.plot([p[0] for p in points], [p[1] for p in points], "s--" if dashed else "o-", ms=4, lw=1.2,
                color=plt.cm.tab20(i / max(1, len(families))), label=family)
    ax.set_xlabel("wall-clock speedup against uncached")
    ax.set_ylabel("PSNR against uncached, dB")
    ax.set_ylim(bottom=max(10, ax.get_ylim()[0]))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(f"Reference model, {steps} euler steps: the pack's caches against fewer steps")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write(results: dict, args, default_name: str) -> str:
    """Markdown for every step count (results: steps -> rows); plots beside it."""
    out = Path(args.out)
    parts = [f"Command: `python bench/bench_reference.py --fronts {' '.join(str(s) for s in results)}"
             f"{' --quick' if args.quick else ''}` ({args.samples} samples, seed {args.seed}, cfg {args.cfg}; "
             f"wall clock: batch of {args.timing_batch}, median of {args.repeats}, round-robin).", ""]
    for steps, rows in results.items():
        plot(rows, out / f"front_{steps}.png", steps)
        _, verdict = target_verdict(rows)
        parts += [f"### {steps} steps", "", table(rows), "", forecast_summary(rows), "",
                  f"Target: {verdict}.", "", f"Default ({default_name}): {default_on_front(rows, default_name)}.", ""]
    text = "\n".join(parts)
    (out / "fronts.md").write_text(text)
    return text
