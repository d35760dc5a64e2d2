"""`make demo`: the example Flux.1-dev workflow through a real headless ComfyUI, uncached and with DuCa.

Builds (once, deterministically; cached in .dtc/models) a Flux-architecture model with random
weights, starts ComfyUI with it, turns workflows/flux_dev_t2i_duca.json into an API prompt on
that model (fixed conditioning instead of the text encoders, the latent saved instead of
decoded) and queues it twice: with the DuCa Cache node bypassed, and as saved. Prints the
DuCa step summary, the wall-clock speedup and the relative L2 distance between the two
latents. Everything it writes is under .dtc/demo; exits non-zero on any failure.
"""
import json
import re
import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file

import workflow_tools as wt
from comfy_server import ServerError, execution_errors, execution_seconds, start_server
from tiny_models import build_checkpoint

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / "workflows" / "flux_dev_t2i_duca.json"
MODEL_CACHE = REPO / ".dtc" / "models"
DEMO_DIR = REPO / ".dtc" / "demo"

# Sized so that the whole demo takes about a minute on 2 CPU cores (uncached sampling ~40 s):
# large enough that sampling, not per-step overhead, dominates the timings.
HIDDEN_SIZE, DOUBLE_BLOCKS, SINGLE_BLOCKS = 768, 2, 4
IMAGE_SIZE = 768
TEXT_TOKENS = 77  # LotusConditioning, which stands in for the text encoders
WARMUP_STEPS = 2
UNET_NAME = "demo_flux_dev.safetensors"
PROMPT_TIMEOUT = 900.0
DUCA_SUMMARY = re.compile(r"DuCa\[\w+\]: [^\n]*")


class DemoError(RuntimeError):
    pass


def build_model() -> Path:
    # Named and built like bench/bench_flux.py's models: a bench run at this size reuses the file.
    name = f"flux_bench_{HIDDEN_SIZE}_{DOUBLE_BLOCKS}_{SINGLE_BLOCKS}.safetensors"
    return build_checkpoint("flux_dev", MODEL_CACHE / name, size="bench", hidden_size=HIDDEN_SIZE,
                            depth=DOUBLE_BLOCKS, depth_single_blocks=SINGLE_BLOCKS, dtype="float32")


def demo_prompts(object_info: dict) -> tuple[dict, dict, dict]:
    """(warm-up, uncached, DuCa) API prompts of the example workflow on the demo model."""
    workflow = json.loads(WORKFLOW.read_text())

    def on_demo_model(prefix, steps=None):
        return wt.substitute_tiny_model(wt.ui_to_api(workflow, object_info), UNET_NAME, width=IMAGE_SIZE,
                                        height=IMAGE_SIZE, steps=steps, filename_prefix=f"demo/{prefix}")

    cached = on_demo_model("duca")
    # Bypassed the way the web UI does it: the node is left out and KSampler takes the
    # loader's model directly.
    for node in workflow["nodes"]:
        if node["type"] == "DuCaCache":
            node["mode"] = wt.BYPASSED
    return on_demo_model("warmup", steps=WARMUP_STEPS), on_demo_model("uncached"), cached


def run(server, prompt: dict, label: str):
    """(seconds the server spent executing it, its log, the latent file it saved, that latent)."""
    print(f"  {label} ...", flush=True)
    entry, log = server.run(prompt, timeout=PROMPT_TIMEOUT)
    if entry["status"]["status_str"] != "success":
        errors = json.dumps(execution_errors(entry), indent=1)[:4000]
        raise DemoError(f"the {label} prompt failed: {errors}\n{log[-4000:]}")
    save_id, _ = wt.node_of_type(prompt, "SaveLatent")
    (latent_file,) = server.output_files(entry, save_id)
    return execution_seconds(entry), log, latent_file, load_file(str(latent_file))["latent_tensor"]


def main() -> int:
    print(f"Building the Flux-architecture demo model (cached in {MODEL_CACHE.relative_to(REPO)}) ...", flush=True)
    model_path = build_model()
    shutil.rmtree(DEMO_DIR, ignore_errors=True)
    print("Starting a headless ComfyUI server ...", flush=True)
    with start_server(DEMO_DIR, models={f"diffusion_models/{UNET_NAME}": model_path}) as server:
        version = server.get("/system_stats")["system"]["comfyui_version"]
        print(f"  ComfyUI {version} ready in {server.started_in:.1f} s at {server.url}", flush=True)
        warmup, uncached, cached = demo_prompts(wt.load_object_info(server.url))
        # Loads the model and warms up the kernels, so neither timed run pays for that.
        run(server, warmup, f"warm-up ({WARMUP_STEPS} steps)")
        uncached_s, _, uncached_file, uncached_latent = run(server, uncached, "uncached")
        cached_s, cached_log, cached_file, cached_latent = run(server, cached, "DuCa")
        log_path = server.log_path

    summaries = DUCA_SUMMARY.findall(cached_log)
    if not summaries:
        raise DemoError(f"no DuCa summary in the server log of the DuCa run:\n{cached_log[-4000:]}")
    relative_l2 = float((cached_latent - uncached_latent).norm() / uncached_latent.norm())
    _, sampler = wt.node_of_type(cached, "KSampler")
    _, duca = wt.node_of_type(cached, "DuCaCache")
    settings = sampler["inputs"]
    cache = duca["inputs"]
    image_tokens = (IMAGE_SIZE // 16) ** 2  # 8x VAE downscale, then 2x2 patches

    print(f"""
DuCa demo: {WORKFLOW.relative_to(REPO)} on ComfyUI {version}, CPU
  model     Flux.1-dev architecture, random weights: hidden {HIDDEN_SIZE}, {DOUBLE_BLOCKS} double + {SINGLE_BLOCKS} single blocks
  image     {IMAGE_SIZE}x{IMAGE_SIZE} ({image_tokens} image + {TEXT_TOKENS} text tokens), {settings['steps']} {settings['sampler_name']}/{settings['scheduler']} steps, seed {settings['seed']}
  DuCa      {cache['mode']}, cache_ratio {cache['cache_ratio']}, cycle_length {cache['cycle_length']}, selector {cache['selector']}
            {summaries[-1]}
  time      uncached {uncached_s:.1f} s, DuCa {cached_s:.1f} s (prompt execution, from /history)
  speedup   {uncached_s / cached_s:.2f}x wall clock
  rel. L2   {relative_l2:.4f} (DuCa latent against the uncached one)
  files     {uncached_file.relative_to(REPO)}
            {cached_file.relative_to(REPO)}
            {log_path.relative_to(REPO)} (server log)
            {model_path.relative_to(REPO)} (model)""")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (DemoError, ServerError) as err:
        print(f"demo failed: {err}", file=sys.stderr)
        sys.exit(1)
