"""The reference benchmark's report: results table, the papers' claims with
the verdict the numbers give, a Pareto plot and an image grid."""
import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

GRID_METHODS = ("uncached", "DuCa N=3 r=0.9", "DuCa N=5 r=0.9", "ToCa N=5 r=0.9", "FORA N=5", "DuCa N=8 r=0.9",
                "TokenCache learned I=4 r=0.9", "EasyCache t=0.3", "LazyCache t=0.3")
FRONTS = ("DuCa", "ToCa", "FORA", "TokenCache", "EasyCache", "LazyCache", "fewer steps", "DuCa selectors", "DuCa order",
          "DuCa attention variant", "TokenCache scoring", "TokenCache placement", "TokenCache LoRA")


def _fmt(value, digits=3):
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def results_table(rows) -> str:
    lines = ["| method | steps | theoretical | wall speedup | PSNR dB | SSIM | rel L2 | class acc (all 3) | shape acc | FD |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['steps']} | {r['theoretical']:.2f}x | {r['wall_speedup']:.2f}x | "
                     f"{_fmt(r['psnr'], 2)} | {_fmt(r['ssim'])} | {_fmt(r['rel_l2'])} | {r['acc_all']:.3f} | "
                     f"{r['acc_shape']:.3f} | {r['fd']:.2f} |")
    return "\n".join(lines)


def _by_name(rows):
    return {r["method"]: r for r in rows}


def _front(rows, family):
    points = sorted((r["theoretical"], r["psnr"]) for r in rows if r["family"] == family)
    return points


def _interpolate(points, x):
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else max(y0, y1)
    return None


def claim_selectors(rows):
    named = _by_name(rows)
    base = named.get("DuCa N=5 r=0.9")
    others = {s: named.get(f"DuCa N=5 r=0.9 {s}") for s in ("attention", "v_norm", "k_norm", "similarity")}
    if base is None or others["attention"] is None:
        return None
    lines = ["| selector (DuCa N=5, r=0.9) | PSNR dB | SSIM | class acc | FD |", "|---|---|---|---|---|"]
    for name, r in [("random", base)] + list(others.items()):
        lines.append(f"| {name} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['acc_all']:.3f} | {r['fd']:.2f} |")
    attention = others["attention"]
    better_psnr, better_fd = base["psnr"] >= attention["psnr"] - 0.1, base["fd"] <= attention["fd"] * 1.05
    verdict = "confirmed" if better_psnr and better_fd else "not confirmed" if not (better_psnr or better_fd) else "mixed"
    return ("Random token selection is as good as or better than attention-score selection at the same cache ratio (DuCa)",
            "\n".join(lines), f"{verdict}: random {base['psnr']:.2f} dB / FD {base['fd']:.2f} against attention "
            f"{attention['psnr']:.2f} dB / FD {attention['fd']:.2f} (as good = within 0.1 dB and 5 % FD)")


def claim_step_errors(step_errors):
    if not step_errors:
        return None
    mean_error = {}
    for mode, kind in (("fora", "aggressive"), ("toca", "conservative")):
        groups = defaultdict(list)
        for record in step_errors[mode]:
            if record["kind"] == kind:
                groups[record["since_full"]].append(record["error"])
        mean_error[kind] = {d: sum(v) / len(v) for d, v in groups.items()}
    distances = sorted(set(mean_error["aggressive"]) & set(mean_error["conservative"]))
    if len(distances) < 2:
        return None
    lines = ["| steps since the full step | aggressive error | conservative error | aggressive / conservative |",
             "|---|---|---|---|"]
    for d in distances:
        a, c = mean_error["aggressive"][d], mean_error["conservative"][d]
        lines.append(f"| {d} | {a:.4f} | {c:.4f} | {a / c:.2f} |")
    first, later = distances[0], distances[min(3, len(distances) - 1)]
    ratio_first = mean_error["aggressive"][first] / mean_error["conservative"][first]
    ratio_later = mean_error["aggressive"][later] / mean_error["conservative"][later]
    close_first = abs(ratio_first - 1) < 0.3
    diverge = ratio_later > 1.5 * ratio_first
    verdict = "confirmed" if close_first and diverge else "not confirmed" if not (close_first or diverge) else "mixed"
    return ("At the first caching step after a full step, aggressive and conservative caching give nearly the same "
            "error; later they diverge (DuCa)", "\n".join(lines),
            f"{verdict}: ratio {ratio_first:.2f} one step after the full step (nearly the same = within 30 %), "
            f"{ratio_later:.2f} at {later} steps (diverged = 1.5x the first ratio). Relative L2 of the model output "
            "against a full computation on the same input, long FORA and ToCa cycles, teacher-free (each method on "
            "its own trajectory).")


def claim_equal_work(rows):
    fronts = {f: _front(rows, f) for f in ("DuCa", "ToCa", "FORA")}
    if any(len(p) < 2 for p in fronts.values()):
        return None
    low = max(p[0][0] for p in fronts.values())
    high = min(p[-1][0] for p in fronts.values())
    if high <= low:
        return None
    lines = ["| theoretical speedup | DuCa PSNR dB | ToCa PSNR dB | FORA PSNR dB | best |", "|---|---|---|---|---|"]
    wins = []
    for i in range(4):
        x = low + (high - low) * i / 3
        values = {f: _interpolate(p, x) for f, p in fronts.items()}
        best = max(values, key=values.get)
        wins.append(best == "DuCa")
        lines.append(f"| {x:.2f}x | {values['DuCa']:.2f} | {values['ToCa']:.2f} | {values['FORA']:.2f} | {best} |")
    verdict = "confirmed" if all(wins) else "not confirmed" if not any(wins) else "mixed"
    return ("At equal computed work, DuCa beats ToCa and FORA in quality (DuCa)", "\n".join(lines),
            f"{verdict}: PSNR against uncached read off each method's Pareto front (linear interpolation "
            f"between measured settings) at equal theoretical speedup; DuCa best at {sum(wins)} of {len(wins)} points")


def claim_order(rows):
    named = _by_name(rows)
    first, second = named.get("DuCa N=5 r=0.9"), named.get("DuCa N=5 r=0.9 conservative-first")
    if first is None or second is None:
        return None
    lines = ["| cycle order (N=5, r=0.9) | PSNR dB | SSIM | class acc | FD | theoretical |", "|---|---|---|---|---|---|"]
    for name, r in (("full, aggressive, conservative, ... (paper)", first), ("full, conservative, aggressive, ...", second)):
        lines.append(f"| {name} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['acc_all']:.3f} | {r['fd']:.2f} | {r['theoretical']:.2f}x |")
    better = "aggressive first" if first["psnr"] >= second["psnr"] else "conservative first"
    return ("Order within the cycle: aggressive first vs conservative first", "\n".join(lines),
            f"measured: {better} is closer to the uncached output ({first['psnr']:.2f} vs {second['psnr']:.2f} dB)")


def _tokencache_rows(rows, header, entries):
    lines = [f"| {header} | theoretical | PSNR dB | SSIM | class acc | FD |", "|---|---|---|---|---|---|"]
    for label, r in entries:
        lines.append(f"| {label} | {r['theoretical']:.2f}x | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['acc_all']:.3f} | "
                     f"{r['fd']:.2f} |")
    return lines


def claim_tokencache(rows):
    named = _by_name(rows)
    scorings = (("learned: first-block predictor, chained objective", "TokenCache learned I=4 r=0.9"),
                ("learned: MLP-mixer, chained objective", "TokenCache mlp_mixer I=4 r=0.9"),
                ("learned: MLP-mixer, first-order objective", "TokenCache mlp_mixer first_order I=4 r=0.9"),
                ("learned: first-block predictor, p_step objective", "TokenCache learned p_step I=4 r=0.9"),
                ("training-free fallback (output change)", "TokenCache change I=4 r=0.9"),
                ("random", "TokenCache random I=4 r=0.9"))
    # rows added later (issue 12's p_step objective) are shown once measured
    scorings = tuple((label, name) for label, name in scorings
                     if name in named or name != "TokenCache learned p_step I=4 r=0.9")
    placements = (("measured reuse cost (default)", "TokenCache learned I=4 r=0.9"),
                  ("mean predicted importance (the paper's rule)", "TokenCache learned I=4 r=0.9 predicted I-steps"),
                  ("even", "TokenCache learned I=4 r=0.9 even I-steps"),
                  ("even, training-free fallback (the node without a predictor)", "TokenCache change I=4 r=0.9 even I-steps"))
    if any(name not in named for _, name in scorings + placements):
        return None
    lines = _tokencache_rows(rows, "TokenCache scoring (I=4, r=0.9, last 2 blocks protected, measured I-steps)",
                             [(label, named[name]) for label, name in scorings])
    lines += [""] + _tokencache_rows(rows, "I-step placement (I=4, r=0.9, first-block predictor)",
                                     [(label, named[name]) for label, name in placements])
    lora_verdict = ""
    refined = [(label, name, name.replace(" I=4", "+LoRA I=4")) for label, name in
               (scorings[0], scorings[3], scorings[4])]
    if all(with_lora in named for _, _, with_lora in refined):
        entries = []
        for label, without, with_lora in refined:
            entries += [(label, named[without]), (f"{label} + LoRA on the last 2 blocks", named[with_lora])]
        lines += [""] + _tokencache_rows(rows, "TokenCache scoring with and without the LoRA refinement (I=4, r=0.9)",
                                         entries)
        best = named[refined[0][2]]
        random = named[refined[2][1]]
        lora_verdict = (f"; learned + LoRA {best['psnr']:.2f} dB at {best['theoretical']:.2f}x against random "
                        f"{random['psnr']:.2f} dB at {random['theoretical']:.2f}x "
                        f"({best['psnr'] - random['psnr']:+.2f} dB), the LoRA alone "
                        f"{best['psnr'] - named[refined[0][1]]['psnr']:+.2f} dB on the learned scores")
    ranked = sorted(scorings, key=lambda entry: -named[entry[1]]["psnr"])
    learned = named[scorings[0][1]]
    front = _front(rows, "DuCa")
    duca_at = _interpolate(front, learned["theoretical"])
    against_duca = ("outside the measured DuCa front" if duca_at is None else
                    f"DuCa's front gives {duca_at:.2f} dB at the same theoretical speedup")
    best_placement = max(placements[:3], key=lambda entry: named[entry[1]]["psnr"])[0]
    return ("TokenCache: learned predictors vs training-free fallback vs random selection at equal cache ratio, "
            "and where the I-steps go",
            "\n".join(lines),
            f"scorings share the measured I-steps; order by PSNR: {' > '.join(label for label, _ in ranked)}; "
            f"best placement: {best_placement}; the first-block predictor reaches {learned['psnr']:.2f} dB at "
            f"{learned['theoretical']:.2f}x, {against_duca}{lora_verdict}")


def pareto_plot(rows, path: Path, title: str):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, family in enumerate(FRONTS):
        points = sorted((r["theoretical"], r["wall_speedup"], r["psnr"], r["fd"]) for r in rows if r["family"] == family)
        if not points:
            continue
        style = dict(color=plt.cm.tab20(i / len(FRONTS)), label=family)
        axes[0].plot([p[1] for p in points], [p[2] for p in points], "o-", **style)
        axes[1].plot([p[1] for p in points], [p[3] for p in points], "o-", **style)
    axes[0].set_ylabel("PSNR against uncached, dB (higher is better)")
    axes[1].set_ylabel("Fréchet distance to real data (lower is better)")
    axes[1].set_yscale("log")   # EasyCache's broken images are 30x further off than the rest
    uncached = next(r for r in rows if r["method"] == "uncached")
    axes[1].axhline(uncached["fd"], color="grey", ls="--", lw=1, label="uncached")
    for ax in axes:
        ax.set_xlabel("wall-clock speedup against uncached")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def image_grid(outputs, labels, path: Path, columns=8):
    from reference.shapes import describe
    methods = [m for m in GRID_METHODS if m in outputs]
    fig, axes = plt.subplots(len(methods), columns, figsize=(columns * 1.1, len(methods) * 1.2 + 0.4), squeeze=False)
    for i, method in enumerate(methods):
        for j in range(columns):
            ax = axes[i][j]
            ax.imshow(outputs[method][j].permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(method, fontsize=7, rotation=0, ha="right", va="center")
            if i == 0:
                ax.set_title(describe(labels[j]).replace(" ", "\n", 1), fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write(rows, step_errors, outputs, labels, args):
    out = Path(args.out)
    pareto_plot(rows, out / "pareto.png", f"Speed against quality on the reference model ({args.steps} euler steps, cfg {args.cfg})")
    if not args.only:   # an --only run has the images of its own methods only
        image_grid(outputs, labels, out / "grid.png")
    import os
    import platform

    import torch
    machine = f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    command = f"`python bench/bench_reference.py{' --quick' if args.quick else ''}` (`make bench-reference`)"
    if args.only:
        command = (f"`python bench/bench_reference.py --only '{args.only}'`, its rows in place of those of the "
                   f"earlier full run (`make bench-reference`)")
    parts = [f"Command: {command}. "
             f"Machine: {machine}.\n",
             f"Reference model, {args.samples} samples (fixed seed {args.seed}), {args.steps} euler/simple steps, "
             f"cfg {args.cfg}; wall clock: batch of {args.timing_batch}, median of {args.repeats}.\n",
             results_table(rows), ""]
    for claim in (claim_selectors(rows), claim_step_errors(step_errors), claim_equal_work(rows), claim_order(rows),
                  claim_tokencache(rows)):
        if claim is None:
            continue
        title, table, verdict = claim
        parts += [f"### {title}", "", table, "", f"Verdict: {verdict}", ""]
    (out / "report.md").write_text("\n".join(parts))
