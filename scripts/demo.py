"""`make demo`: the project's trained reference model through a real headless
ComfyUI, uncached and with DuCa.

Starts ComfyUI with this pack, turns workflows/shapes_reference_duca.json (the
reference model, a class conditioning, DuCa Cache, KSampler, decode, save)
into an API prompt and queues it for a batch of classes twice: with the DuCa
Cache node bypassed, and as saved. Writes a side-by-side PNG (top row
uncached, bottom row DuCa) and prints the DuCa step summary, the wall-clock
speedup, PSNR/SSIM against the uncached images and the class accuracy the
project's classifier gives both. Everything it writes is under .dtc/demo;
exits non-zero on any failure.
"""
import json
import re
import shutil
import sys
from pathlib import Path

import numpy
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "harness"))

import workflow_tools as wt  # noqa: E402
from accel_core.metrics import psnr, ssim  # noqa: E402
from comfy_server import ServerError, execution_errors, execution_seconds, start_server  # noqa: E402
from reference.classifier import accuracy, load_classifier  # noqa: E402
from reference.model import label_indices  # noqa: E402
from reference.shapes import ATTRIBUTES, describe  # noqa: E402

WORKFLOW = REPO / "workflows" / "shapes_reference_duca.json"
DEMO_DIR = REPO / ".dtc" / "demo"
SIDE_BY_SIDE = DEMO_DIR / "side_by_side.png"
# one image per class shown: every shape in every colour, positions cycling
CLASSES = [(shape, colour, ATTRIBUTES["position"][(i + j) % 4])
           for i, shape in enumerate(ATTRIBUTES["shape"]) for j, colour in enumerate(ATTRIBUTES["colour"])]
IMAGES_PER_CLASS = 4
PROMPT_TIMEOUT = 900.0
DUCA_SUMMARY = re.compile(r"DuCa\[\w+\]: [^\n]*")


class DemoError(RuntimeError):
    pass


def prompt_for(object_info, bypass_cache: bool, klass, prefix: str) -> dict:
    workflow = json.loads(WORKFLOW.read_text())
    for node in workflow["nodes"]:
        if node["type"] == "DuCaCache" and bypass_cache:
            node["mode"] = wt.BYPASSED          # as the web UI bypasses: KSampler takes the loader's model
        if node["type"] == "TokenCacheShapesConditioning":
            node["widgets_values"] = list(klass)
        if node["type"] == "TokenCacheShapesEmptyLatent":
            node["widgets_values"] = [IMAGES_PER_CLASS]
        if node["type"] == "SaveImage":
            node["widgets_values"] = [prefix]
    return wt.ui_to_api(workflow, object_info)


def run(server, prompt: dict, label: str):
    """(seconds the server spent executing it, its log, the images [N, 3, H, W] it saved)."""
    entry, log = server.run(prompt, timeout=PROMPT_TIMEOUT)
    if entry["status"]["status_str"] != "success":
        raise DemoError(f"the {label} prompt failed: {json.dumps(execution_errors(entry), indent=1)[:4000]}\n{log[-4000:]}")
    save_id, _ = wt.node_of_type(prompt, "SaveImage")
    files = sorted(server.output_files(entry, save_id))
    images = [torch.from_numpy(numpy.asarray(Image.open(f).convert("RGB"), dtype=numpy.float32) / 255).permute(2, 0, 1)
              for f in files]
    return execution_seconds(entry), log, torch.stack(images)


def side_by_side(uncached: torch.Tensor, cached: torch.Tensor, path: Path, scale: int = 2):
    def row(images):
        return torch.cat(list(images), dim=2)
    grid = torch.cat((row(uncached), torch.ones(3, 4, uncached.shape[-1] * len(uncached)), row(cached)), dim=1)
    picture = Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(numpy.uint8))
    picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST).save(path)


def main() -> int:
    shutil.rmtree(DEMO_DIR, ignore_errors=True)
    print("Starting a headless ComfyUI server ...", flush=True)
    timings = {"uncached": 0.0, "DuCa": 0.0}
    images = {"uncached": [], "DuCa": []}
    summaries = []
    with start_server(DEMO_DIR) as server:
        version = server.get("/system_stats")["system"]["comfyui_version"]
        print(f"  ComfyUI {version} ready in {server.started_in:.1f} s at {server.url}", flush=True)
        object_info = wt.load_object_info(server.url)
        run(server, prompt_for(object_info, True, CLASSES[0], "warmup"), "warm-up")   # loads the model
        print(f"  sampling {len(CLASSES)} classes x {IMAGES_PER_CLASS} images, uncached and with DuCa ...", flush=True)
        for i, klass in enumerate(CLASSES):
            for label, bypass in (("uncached", True), ("DuCa", False)):
                seconds, log, saved = run(server, prompt_for(object_info, bypass, klass, f"demo/{label}_{i:02d}"), label)
                timings[label] += seconds
                images[label].append(saved)
                if not bypass:
                    summaries += DUCA_SUMMARY.findall(log)
    if not summaries:
        raise DemoError("no DuCa summary in the server log of the DuCa runs")
    uncached, cached = torch.cat(images["uncached"]), torch.cat(images["DuCa"])
    side_by_side(torch.stack([batch[0] for batch in images["uncached"]]),
                 torch.stack([batch[0] for batch in images["DuCa"]]), SIDE_BY_SIDE)
    labels = torch.cat([label_indices(*klass).repeat(IMAGES_PER_CLASS, 1) for klass in CLASSES])
    classifier = load_classifier()
    acc_uncached = accuracy(classifier.predict(uncached), labels)["all"]
    acc_cached = accuracy(classifier.predict(cached), labels)["all"]
    workflow_duca = next(n for n in json.loads(WORKFLOW.read_text())["nodes"] if n["type"] == "DuCaCache")
    ratio, cycle, selector = workflow_duca["widgets_values"][:3]
    print(f"""
DuCa demo: {WORKFLOW.relative_to(REPO)} on ComfyUI {version}, CPU
  model     the project's reference DiT (Flux architecture, trained on drawn shapes), 64x64 images
  classes   {len(CLASSES)} (every shape in every colour), {IMAGES_PER_CLASS} images each, e.g. {describe(labels[0])}
  DuCa      cache_ratio {ratio}, cycle_length {cycle}, selector {selector}
            {summaries[-1]}
  time      uncached {timings['uncached']:.1f} s, DuCa {timings['DuCa']:.1f} s (prompt execution, from /history)
  speedup   {timings['uncached'] / timings['DuCa']:.2f}x wall clock
  quality   PSNR {float(psnr(cached, uncached).mean()):.2f} dB, SSIM {float(ssim(cached, uncached).mean()):.4f} against uncached
  classes   classifier accuracy (all three attributes right): uncached {acc_uncached:.3f}, DuCa {acc_cached:.3f}
  picture   {SIDE_BY_SIDE.relative_to(REPO)} (top: uncached, bottom: DuCa)""")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (DemoError, ServerError) as err:
        print(f"demo failed: {err}", file=sys.stderr)
        sys.exit(1)
