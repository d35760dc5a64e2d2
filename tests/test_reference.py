"""The project's reference model: ComfyUI's own detection loads it, it draws
the classes it is asked for, its demo nodes work, and the benchmark runner's
quick mode runs."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import comfy.sd
import nodes
from comfy.ldm.flux.model import Flux

from dit_token_cache.accel_core.config import CacheConfig
from dit_token_cache.nodes.patcher import apply_token_cache
from dit_token_cache.nodes.reference_nodes import ShapesConditioning, ShapesDecode, ShapesEmptyLatent
from dit_token_cache.reference import codec, shapes
from dit_token_cache.reference.classifier import accuracy, load_classifier
from dit_token_cache.reference.model import MODEL_FILE, conditioning

REPO = Path(__file__).resolve().parents[1]
# Stated in BENCHMARKS.md: class accuracy (all three attributes right) of the
# uncached model at this seed, 16 images, 24 euler steps, cfg 4.
STATED_ACCURACY = 0.75   # measured: 0.875 (14 of 16); colour and position 1.0, shape 0.875


@pytest.fixture(scope="module")
def reference_model():
    return comfy.sd.load_diffusion_model(str(MODEL_FILE))


def _draw(model, labels, steps=24, seed=5):
    positive, negative = conditioning(labels)
    latent = ShapesEmptyLatent.execute(labels.shape[0]).result[0]
    (out,) = nodes.common_ksampler(model, seed, steps, 4.0, "euler", "simple", positive, negative, latent)
    return ShapesDecode.execute(out).result[0].movedim(-1, 1)


def test_detected_by_comfyui_as_flux(reference_model):
    assert type(reference_model.model.diffusion_model) is Flux
    assert type(reference_model.model.model_config).__name__ == "FluxSchnell"   # flow matching, shift 1


def test_samples_are_the_classes_asked_for(reference_model):
    labels = shapes.random_labels(16, torch.Generator().manual_seed(99))
    images = _draw(reference_model, labels)
    assert images.shape == (16, 3, 64, 64)
    result = accuracy(load_classifier().predict(images), labels)
    assert result["all"] >= STATED_ACCURACY, result
    cached = _draw(apply_token_cache(reference_model, CacheConfig(cycle_length=3)), labels)
    assert accuracy(load_classifier().predict(cached), labels)["all"] >= STATED_ACCURACY - 0.15


def test_codec_is_exactly_invertible():
    images = shapes.render(shapes.random_labels(4, torch.Generator().manual_seed(0)), torch.Generator().manual_seed(1))
    torch.testing.assert_close(codec.decode(codec.encode(images)), images, rtol=0, atol=1e-6)


def test_demo_nodes_refuse_bad_input():
    with pytest.raises(ValueError, match="accepted circle, square, triangle, cross or any"):
        ShapesConditioning.execute("hexagon", "red", "top-left")
    with pytest.raises(ValueError, match="reference model's latents"):
        ShapesDecode.execute({"samples": torch.zeros(1, 4, 8, 8)})


def test_benchmark_runner_quick_mode(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "bench" / "bench_reference.py"), "--quick", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = (tmp_path / "report.md").read_text()
    assert "| uncached |" in report and "| DuCa N=3 r=0.9 |" in report
    assert (tmp_path / "pareto.png").stat().st_size > 0 and (tmp_path / "grid.png").stat().st_size > 0


def test_fronts_benchmark_quick_mode(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "bench" / "bench_reference.py"), "--quick", "--fronts", "6",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = (tmp_path / "fronts.md").read_text()
    for row in ("| uncached |", "| DuCa N=3 linear |", "| FORA N=3 reuse |", "| 3 dpmpp_2m steps |",
                "| DuCa N=5 linear max_error=0.05 |"):
        assert row in report, row
    assert "Target: " in report and "Default (DuCa N=5 linear)" in report
    assert (tmp_path / "front_6.png").stat().st_size > 0


def test_fronts_report_reads_the_gap_to_fewer_steps_at_equal_wall_speedup():
    sys.path.insert(0, str(REPO / "bench"))
    import fronts

    def row(method, kind, family, wall, psnr):
        return {"method": method, "kind": kind, "family": family, "wall_speedup": wall, "psnr": psnr}
    rows = [row("uncached", "plain", "uncached", 1.0, float("inf")),
            row("10 euler steps", "plain", "fewer steps euler", 2.0, 34.0),
            row("5 euler steps", "plain", "fewer steps euler", 4.0, 28.0),
            row("5 dpmpp_2m steps", "plain", "fewer steps dpmpp_2m", 4.0, 29.0),
            row("DuCa N=5 linear", "ours", "DuCa linear", 3.5, 32.0),
            row("DuCa N=8 reuse", "ours", "DuCa reuse", 3.0, 30.0),
            row("FORA N=8 reuse", "ours", "FORA reuse", 6.0, 25.0)]
    gap, verdict = fronts.target_verdict(rows)
    # fewer steps at 3.5x: between (2.0, 34.0) and (4.0, 29.0) on the best samplers' envelope: 30.25 dB
    assert gap == pytest.approx(32.0 - 30.25) and verdict.startswith("reached") and "DuCa N=5 linear" in verdict
    assert fronts.default_on_front(rows, "DuCa N=5 linear").startswith("on the front")
    assert fronts.default_on_front(rows, "DuCa N=8 reuse").startswith("off the front: DuCa N=5 linear")
    rows[4]["psnr"] = 30.5
    assert fronts.target_verdict(rows)[1].startswith("not reached")
