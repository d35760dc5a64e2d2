"""bench/gpu/gpu_bench.py in its CPU miniature, from the pruned ComfyUI copy
that bench/gpu/make_bundle.py carries to the lent GPU machine: the script runs
every method end to end and writes its report, and every third-party package
it imports is on the device image, among the bundle's wheels, or declared not
needed there, so the one-call GPU run cannot rot between lent machines."""
import importlib.metadata
import json
import re
import subprocess
import sys

import pytest

from conftest import COMFYUI, REPO

GPU = REPO / "bench" / "gpu"


def _distribution(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpu_bench")
    subprocess.run([sys.executable, str(GPU / "make_bundle.py"), "--comfyui", str(COMFYUI), "--out", str(folder / "bundle"),
                    "--no-wheels"], check=True, capture_output=True)
    assert not (folder / "bundle" / "ComfyUI" / "comfy" / "text_encoders" / "t5_tokenizer").exists()
    done = subprocess.run([sys.executable, str(GPU / "gpu_bench.py"), "--mini", "--comfyui",
                           str(folder / "bundle" / "ComfyUI"), "--out", str(folder / "out")],
                          capture_output=True, text=True, cwd=folder)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder / "out"


def test_every_method_is_measured(report):
    data = json.loads((report / "gpu_bench.json").read_text())
    rows = {row["method"]: row for row in data["rows"]}
    assert list(rows) == ["uncached", "DuCa N=5 reuse", "DuCa default (node defaults)", "FORA N=5", "ToCa N=5",
                          "DuCa N=3 reuse", "DuCa N=8 reuse", "DuCa N=1 (overhead)", "EasyCache t=0.1", "EasyCache t=0.3"]
    assert data["mini"] and not data["skipped"] and all(row["wall_s"] > 0 for row in rows.values())
    assert rows["uncached"]["wall_speedup"] == rows["uncached"]["work_speedup"] == 1.0
    # 2 steps: a full step, then an aggressive (DuCa, FORA) or conservative (ToCa) one
    for name in ("DuCa N=5 reuse", "FORA N=5", "DuCa N=3 reuse", "DuCa default (node defaults)"):
        assert rows[name]["work_speedup"] == pytest.approx(2.0) and rows[name]["cache_bytes"] > 0
    assert 1.0 < rows["ToCa N=5"]["work_speedup"] < 2.0
    assert rows["DuCa N=1 (overhead)"]["work_speedup"] == 1.0
    assert rows["DuCa N=5 reuse"]["summary"].startswith("DuCa") and rows["uncached"]["summary"] == ""
    table = (report / "gpu_bench.md").read_text()
    assert all(f"| {name} |" in table for name in rows)
    assert "Self CPU" in (report / "profile.txt").read_text()


def test_what_it_imports_travels_or_is_on_the_device(report):
    modules = json.loads((report / "gpu_bench.json").read_text())["modules"]
    device = {_distribution(line) for line in (GPU / "device_packages.txt").read_text().splitlines()
              if line and not line.startswith("#")}
    wheels_text = (GPU / "wheels.txt").read_text()
    carried = {_distribution(line.split("==")[0]) for line in wheels_text.splitlines() if "==" in line.split("#")[0]}
    not_needed = {_distribution(name) for line in wheels_text.split("Not carried")[1].splitlines()[1:]
                  for name in line.lstrip("# ").split("  ")[0].split(", ")}
    owners = importlib.metadata.packages_distributions()
    needed = {_distribution(dist) for module in modules if module not in sys.stdlib_module_names
              for dist in owners.get(module, [])}
    assert needed, modules
    # nvidia-*: the CUDA runtime wheels of this venv's torch; the image has its own CUDA torch
    missing = {name for name in needed - device - carried - not_needed if not name.startswith("nvidia-")}
    assert not missing, f"imported by the GPU bench, on neither the device image nor in bench/gpu/wheels.txt: {missing}"
