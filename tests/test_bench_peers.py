"""bench/bench_peers.py in its quick mode: every family of method runs on the
reference model in diffusers, and the work count sees what each one skips."""
import json
import subprocess
import sys

from conftest import REPO


def test_peers_benchmark_quick_mode(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "bench" / "bench_peers.py"), "--quick", "--out", str(tmp_path),
                             "--plot", str(tmp_path / "front.png")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "peers.json").read_text())
    rows = {row["method"]: row for row in report["results"]["6"]}
    families = {row["family"] for row in rows.values()}
    assert {"uncached", "fewer steps", "fewer steps heun", "ours DuCa reuse", "ours ToCa linear", "ours FORA reuse",
            "diffusers FirstBlockCache", "diffusers TaylorSeerCache", "diffusers MagCache", "diffusers SeaCache",
            "diffusers PAB", "diffusers FasterCache", "cache-dit DBCache", "cache-dit DBCache + TaylorSeer"} <= families
    assert rows["uncached"]["work_speedup"] == 1.0 and rows["uncached"]["psnr"] == 100.0
    # Euler 3 steps: half the evaluations; Heun 2 steps: 3 evaluations of 6
    assert rows["3 euler steps"]["work_speedup"] == rows["2 heun steps"]["work_speedup"] == 2.0
    # FORA N=3 (full, aggressive, aggressive x 2): 2 of 6 evaluations; the others in between
    assert rows["FORA N=3 reuse"]["work_speedup"] > rows["DuCa N=3 reuse"]["work_speedup"] > \
        rows["ToCa N=3 reuse"]["work_speedup"] > 1.0
    # every peer skips something here, each in its own way (whole steps, attention, the unconditional half)
    for name in ("TaylorSeerCache interval=3", "MagCache t=0.5 K=4", "SeaCache t=0.5", "PAB attention every 2",
                 "FasterCache attention every 2, uncond every 3", "DBCache t=0.4", "DBCache+TaylorSeer t=0.4"):
        assert rows[name]["work_speedup"] > 1.0, name
    assert len(report["mag_ratios"]["6"]) == 6   # MagCache's own calibration: a ratio a step
    assert all(0 < row["psnr"] < 100 for name, row in rows.items() if row["work_speedup"] > 1.0)
    # peak memory of one generation: fewer steps run the same calls (the same activations); the pack's
    # caches hold block outputs, a linear forecast two full steps of them
    assert rows["uncached"]["memory_ratio"] == 1.0
    assert abs(rows["3 euler steps"]["memory_ratio"] - 1.0) < 0.05
    assert rows["DuCa N=3 linear"]["peak_bytes"] > rows["DuCa N=3 reuse"]["peak_bytes"] > rows["uncached"]["peak_bytes"]
    assert (tmp_path / "front.png").stat().st_size > 0
    assert report["diffusers"] == "0.42.1" and report["cache_dit"] == "1.5.3"


def test_the_front_table_reads_the_best_row_at_or_above_each_speed():
    sys.path.insert(0, str(REPO / "bench"))
    from bench_peers import best_at, front_table
    rows = [{"method": m, "family": f, "work_speedup": w, "wall_speedup": w, "psnr": p} for m, f, w, p in (
        ("a", "ours FORA reuse", 2.0, 30.0), ("b", "ours DuCa linear", 3.0, 28.0), ("c", "diffusers SeaCache", 1.9, 40.0),
        ("d", "cache-dit DBCache", 2.5, 29.0), ("e", "fewer steps", 2.0, 31.0))]
    assert best_at(rows, 2, "work_speedup", ("ours",))["method"] == "a"
    assert best_at(rows, 2, "work_speedup", ("diffusers", "cache-dit"))["method"] == "d"   # c is slower than 2x
    assert best_at(rows, 3.5, "work_speedup", ("ours",)) is None
    table = front_table({20: rows}, speeds=(2, 3))
    assert "| 2x | 30.00 dB (a, 2.00x) | 29.00 dB (d, 2.50x) | 31.00 dB (e, 2.00x) | +1.00 dB |" in table
    assert "| 3x | 28.00 dB (b, 3.00x) | none | none | n/a |" in table
