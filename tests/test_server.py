"""The pack inside a real headless ComfyUI server: it loads, its node is described the way the
web UI needs, the example workflows are valid and run (on tiny checkpoints), and bad settings
are refused without taking the server down.

One server per module (start-up is ~10 s on CPU), started by harness/comfy_server.py from
$DTC_COMFYUI with --cpu on a free loopback port; models, input, output, temp, user and datasets folders
are in a tmp dir, and it is always stopped by its own pid.
"""
import copy
import json
import os
import re
import time
from pathlib import Path

import pytest

import workflow_tools as wt  # harness/, on sys.path through conftest
from comfy_server import execution_errors, start_server
from tiny_models import FAMILIES, build_checkpoint, model_config

from dit_token_cache.nodes.duca_node import DEFAULT_FORECAST, DEFAULT_PRECISION
from dit_token_cache.nodes.tokencache_nodes import TOKENCACHE_FORECAST

REPO = Path(__file__).resolve().parents[1]
COMFYUI = Path(os.environ.get("DTC_COMFYUI", REPO / ".dtc" / "ComfyUI")).resolve()
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
DEV_DUCA = REPO / "workflows" / "flux_dev_t2i_duca.json"
PACK_DIR_NAME = "dit-token-cache"

# Tiny stand-in for each diffusion model the example workflows load.
TINY_FAMILY = {
    "flux1-dev.safetensors": "flux_dev",
    "flux1-schnell.safetensors": "flux_schnell",
    "PixArt-Sigma-XL-2-1024-MS.safetensors": "pixart_sigma",
    "sd3.5_large.safetensors": "sd3",
    "wan2.1_t2v_14B_bf16.safetensors": "wan_t2v",
    "wan2.1_i2v_480p_14B_fp16.safetensors": "wan_i2v",
    "qwen_image_fp8_e4m3fn.safetensors": "qwen_image",
}
# Families whose ComfyUI model reads the pooled text output whatever the conditioning (SD3:
# CLIP-L + CLIP-G); LotusConditioning has none, so they get a text dataset with one.
POOLED_TEXT = {"sd3"}
# Pixel size of a tiny run's latent where 64 x 64 does not do: PixArtMS's position embedding is
# NaN for a latent side sum under 66, and its width of 1152 makes tokens dear.
TINY_SIZE = {"pixart_sigma": (512, 16), "qwen_image": (32, 32)}   # Qwen-Image: width 3072
LOTUS_TEXT_WIDTH = 1024   # LotusConditioning: [1, 77, 1024]
TINY_STEPS = 6
SHIPPED_MODEL = "TokenCacheShapesModel"

DUCA_WIDGETS = ["cache_ratio", "cycle_length", "selector", "start_percent", "end_percent", "seed",
                "mode", "staleness_weight", "cache_device", "forecast", "max_error", "cache_precision",
                "cache_budget_gb"]

SUMMARY = re.compile(r"DuCa\[(\w+)\]: (\d+) steps \((\d+) full, (\d+) aggressive, (\d+) conservative\)")
TOKENCACHE_SUMMARY = re.compile(r"TokenCache\[([\w+]+)\]: (\d+) steps \((\d+) full, (\d+) aggressive, (\d+) conservative\)")
CACHE_NODES = ("DuCaCache", "TokenCache")
TRAIN_NODE = "TokenCacheTrainPredictor"


# --------------------------------------------------------------------------- server


def _tiny_name(family: str) -> str:
    return f"tiny_{family}.safetensors"


def _text_width(family: str) -> int:
    return model_config(family)[FAMILIES[family].context_key]


def _text_source(family: str) -> tuple:
    """(text width, pooled output width or None) of the conditioning a tiny run of `family` needs."""
    return _text_width(family), FAMILIES[family].pooled_dim if family in POOLED_TEXT else None


def _text_dataset(width: int, pooled: int | None = None) -> str:
    return f"dtc_text_{width}" if pooled is None else f"dtc_text_{width}_pooled_{pooled}"


def _write_text_dataset(folder: Path, width: int, pooled: int | None = None) -> None:
    """A [1, 77, width] conditioning (with a [1, pooled] pooled output if given) that ComfyUI's
    LoadTrainingDataset reads, for tiny models whose text width detection fixes at other than
    LotusConditioning's, or that need a pooled output (no core node makes one)."""
    import torch
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    text = torch.randn(1, 77, width, generator=generator)
    extra = {} if pooled is None else {"pooled_output": torch.randn(1, pooled, generator=generator)}
    torch.save({"latents": [{"samples": torch.zeros(1, 4, 8, 8)}], "conditioning": [[[text, extra]]]},
               folder / "shard_00000.pkl")
    (folder / "metadata.json").write_text("{}")   # what makes ComfyUI list the folder


def _write_input_images(folder: Path) -> None:
    """The images the workflows' LoadImage nodes name, so the server lists them and the
    workflows validate (a user loads their own)."""
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    for path in WORKFLOWS:
        for node in json.loads(path.read_text())["nodes"]:
            if node["type"] == "LoadImage":
                Image.new("RGB", (64, 64), (200, 120, 40)).save(folder / node["widgets_values"][0])


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir):
    # Built once per machine and cached in model_dir; the server gets its own copies.
    families = sorted(set(TINY_FAMILY.values()))
    models = {f"diffusion_models/{_tiny_name(family)}": build_checkpoint(family, model_dir / f"{family}_tiny.safetensors")
              for family in families}
    base = tmp_path_factory.mktemp("comfy_server")
    for width, pooled in {_text_source(family) for family in families} - {(LOTUS_TEXT_WIDTH, None)}:
        _write_text_dataset(base / "datasets" / _text_dataset(width, pooled), width, pooled)
    _write_input_images(base / "input")
    with start_server(base, models=models, comfyui=COMFYUI) as srv:
        yield srv


@pytest.fixture(scope="module")
def object_info(server):
    return wt.load_object_info(server.url)


def _tiny_prompt(object_info, workflow_path, prefix=None, **duca_overrides):
    workflow = json.loads(workflow_path.read_text())
    api = wt.ui_to_api(workflow, object_info)
    if any(n["class_type"] == SHIPPED_MODEL for n in api.values()):
        # the pack's own reference model is small enough to run as shipped
        prompt = copy.deepcopy(api)
        for node in prompt.values():
            if node["class_type"] == "KSampler":
                node["inputs"]["steps"] = min(node["inputs"]["steps"], TINY_STEPS)
            if node["class_type"] == "SaveImage":
                node["inputs"]["filename_prefix"] = f"images/{prefix or workflow_path.stem}"
            if node["class_type"] == "TokenCacheShapesEmptyLatent":
                node["inputs"]["batch_size"] = 1
    else:
        unets = [n["inputs"]["unet_name"] for n in api.values() if n["class_type"] == "UNETLoader"]
        assert len(unets) == 1, f"{workflow_path.name}: expected one UNETLoader, found {unets}"
        assert unets[0] in TINY_FAMILY, f"{workflow_path.name}: no tiny stand-in for {unets[0]}; add it to TINY_FAMILY"
        family = TINY_FAMILY[unets[0]]
        width, height = TINY_SIZE.get(family, (64, 64))
        text = _text_source(family)
        prompt = wt.substitute_tiny_model(api, _tiny_name(family), width=width, height=height, steps=TINY_STEPS,
                                          filename_prefix=f"latents/{prefix or workflow_path.stem}",
                                          text_dataset=None if text == (LOTUS_TEXT_WIDTH, None) else _text_dataset(*text))
    for node in prompt.values():
        if node["class_type"] == "DuCaCache":
            node["inputs"].update(duca_overrides)
    return prompt


def _expected_counts(mode, cycle_length, steps):
    """(full, aggressive, conservative) for a whole-schedule window, from the DuCa/ToCa/FORA rules."""
    counts = {"full": 0, "aggressive": 0, "conservative": 0}
    for step in range(steps):
        position = step % cycle_length
        if position == 0:
            counts["full"] += 1
        elif mode == "toca":
            counts["conservative"] += 1
        elif mode == "fora":
            counts["aggressive"] += 1
        else:
            counts["aggressive" if position % 2 == 1 else "conservative"] += 1
    return counts["full"], counts["aggressive"], counts["conservative"]


# --------------------------------------------------------------------------- tests


def test_pack_loads_without_errors(server):
    log = server.log()
    bad = [line for line in log.splitlines()
           if PACK_DIR_NAME in line and re.search(r"Cannot import|IMPORT FAILED|Error while calling comfy_entrypoint|Skip ", line)]
    assert not bad, "pack failed to import:\n" + "\n".join(bad) + "\n\n" + server.log_tail()
    loaded = [line for line in log.splitlines() if line.strip().endswith(f"custom_nodes/{PACK_DIR_NAME}")]
    assert loaded, f"no import-time line for {PACK_DIR_NAME} in the server log:\n{server.log_tail()}"
    print(f"server ready in {server.started_in:.1f} s")


def test_node_definition(server):
    info = server.get("/object_info/DuCaCache")["DuCaCache"]
    assert info["display_name"] == "DuCa Cache"
    assert info["category"] == "sampling/token_cache"
    assert info["output"] == ["MODEL"]
    assert info["input_order"]["required"] == ["model"] + DUCA_WIDGETS
    required = info["input"]["required"]
    missing = [name for name, spec in required.items() if not (len(spec) > 1 and spec[1].get("tooltip"))]
    assert not missing, f"inputs without tooltip: {missing}"
    assert all(info.get("output_tooltips") or [None]), "output without tooltip"
    assert info["description"]
    # node search finds them by the names users know the methods by
    for node, words in (("DuCaCache", ["ToCa", "FORA", "token cache", "feature cache", "speed up"]),
                        ("TokenCache", ["token cache", "feature cache", "speed up"])):
        aliases = server.get(f"/object_info/{node}")[node].get("search_aliases") or []
        assert set(words) <= set(aliases), (node, aliases)

    specs = wt.widget_specs(info)
    assert [s.name for s in specs] == DUCA_WIDGETS
    assert {s.name: s.extra for s in specs if s.extra} == {"seed": ("control",)}
    assert wt.default_control(specs[DUCA_WIDGETS.index("seed")]) == "fixed"
    assert [s.name for s in specs if s.options.get("advanced")] == ["mode", "staleness_weight", "cache_device",
                                                                     "max_error"]
    combos = {s.name: list(s.choices) for s in specs if s.kind == "COMBO"}
    assert combos == {"selector": ["random", "v_norm", "k_norm", "similarity", "attention"],
                      "mode": ["duca", "toca", "fora"], "cache_device": ["model_device", "cpu"],
                      "forecast": ["reuse", "linear", "quadratic"], "cache_precision": ["model", "bf16", "fp8"]}


def test_workflows_present():
    names = {p.name for p in WORKFLOWS}
    assert {"flux_dev_t2i_duca.json", "flux_dev_t2i_toca.json"} <= names, names


@pytest.mark.parametrize("name, node_type, added", [
    ("shapes_reference_tokencache", "TokenCache", {"i_step_placement": "measured", "forecast": TOKENCACHE_FORECAST,
                                                   "cache_precision": DEFAULT_PRECISION, "cache_budget_gb": 0.0}),
    ("shapes_reference_duca", "DuCaCache", {"forecast": DEFAULT_FORECAST, "max_error": 0.0,
                                            "cache_precision": DEFAULT_PRECISION, "cache_budget_gb": 0.0}),
    ("shapes_reference_train_predictor", TRAIN_NODE, {"architecture": "first_block", "objective": "chained"})])
def test_workflow_saved_before_new_widgets_loads_with_their_defaults(name, node_type, added, object_info):
    """Files shared before a widget was added at the end still load: the new
    widgets take their defaults, as in ComfyUI's frontend."""
    workflow = json.loads((REPO / "workflows" / f"{name}.json").read_text())
    node = next(n for n in workflow["nodes"] if n["type"] == node_type)
    node["widgets_values"] = node["widgets_values"][:-len(added)]
    assert wt.check_ui_workflow(workflow, object_info) == []
    _, converted = wt.node_of_type(wt.ui_to_api(workflow, object_info), node_type)
    assert {k: converted["inputs"][k] for k in added} == added
    node["widgets_values"] = node["widgets_values"] + list(added.values()) + ["unknown"]   # more values than widgets
    assert wt.check_ui_workflow(workflow, object_info)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_is_valid(path, object_info):
    workflow = json.loads(path.read_text())
    assert workflow.get("version") == 0.4
    assert wt.check_ui_workflow(workflow, object_info) == []
    api = wt.ui_to_api(workflow, object_info)
    if any(n["class_type"] == TRAIN_NODE for n in api.values()):
        return   # trains a predictor; test_train_then_use_predictor runs it
    # The cache node sits between the diffusion model loader (maybe behind ModelSampling patches) and the sampler.
    duca_id, duca = next((nid, n) for nid, n in api.items() if n["class_type"] in CACHE_NODES)
    (unet_id, _), = [(nid, n) for nid, n in api.items() if n["class_type"] in ("UNETLoader", SHIPPED_MODEL)]
    _, sampler = wt.node_of_type(api, "KSampler")
    model_source = duca["inputs"]["model"]
    while api[model_source[0]]["class_type"].startswith("ModelSampling"):
        model_source = api[model_source[0]]["inputs"]["model"]
    assert model_source == [unet_id, 0]
    assert sampler["inputs"]["model"] == [duca_id, 0]
    # The seed's control value is saved in the workflow but never sent to the server.
    assert all(v not in wt.CONTROL_VALUES for n in api.values() for v in n["inputs"].values() if isinstance(v, str))
    assert set(wt.ui_to_api(workflow, object_info)) == {str(n["id"]) for n in workflow["nodes"]
                                                         if n["type"] not in wt.VIRTUAL_NODES}


@pytest.mark.parametrize("path", [p for p in WORKFLOWS if TRAIN_NODE not in p.read_text()], ids=lambda p: p.stem)
def test_workflow_runs_on_tiny_model(path, server, object_info):
    prompt = _tiny_prompt(object_info, path)
    if any(n["class_type"] == "TokenCache" for n in prompt.values()):
        _run_tokencache_prompt(server, prompt, path.stem)
        return
    _, duca = wt.node_of_type(prompt, "DuCaCache")
    _, sampler = wt.node_of_type(prompt, "KSampler")
    (save_id, save), = [(nid, n) for nid, n in prompt.items() if n["class_type"] in ("SaveLatent", "SaveImage")]

    started = time.monotonic()
    entry, log = server.run(prompt)
    elapsed = time.monotonic() - started
    assert entry["status"]["status_str"] == "success", (
        f"{path.name} failed: {json.dumps(execution_errors(entry), indent=1)[:6000]}\n{log[-4000:]}")

    files = server.output_files(entry, save_id)
    assert len(files) == 1, files
    written = files[0]
    assert written.is_file() and written.stat().st_size > 0, written

    if save["class_type"] == "SaveLatent":
        from safetensors.torch import load_file
        tensor = load_file(str(written))["latent_tensor"]
        (_, latent), = [(nid, n) for nid, n in prompt.items() if n["class_type"] in wt.LATENT_SOURCES]
        size = (latent["inputs"]["height"] // 8, latent["inputs"]["width"] // 8)
        assert tensor.shape[0] == 1 and tuple(tensor.shape[-2:]) == size, tensor.shape
        assert bool(tensor.isfinite().all())
    else:   # the reference model decodes to a real picture
        from PIL import Image
        import numpy
        pixels = numpy.asarray(Image.open(written).convert("RGB"), dtype=numpy.float32)
        assert pixels.shape == (64, 64, 3) and pixels.std() > 5, (pixels.shape, pixels.std())

    # The cache really ran inside the server, with the workflow's own settings.
    settings = duca["inputs"]
    summaries = SUMMARY.findall(log)
    assert summaries, f"no DuCa summary in the server log:\n{log[-4000:]}"
    mode, steps, full, aggressive, conservative = summaries[-1]
    expected = _expected_counts(settings["mode"], settings["cycle_length"], sampler["inputs"]["steps"])
    assert (mode, int(steps), (int(full), int(aggressive), int(conservative))) == (
        settings["mode"], sampler["inputs"]["steps"], expected), summaries[-1]
    print(f"{path.stem}: {elapsed:.1f} s, {summaries[-1]}")


def _run_tokencache_prompt(server, prompt, name):
    """Runs a TokenCache workflow; its summary must show the I-steps asked for."""
    _, node = wt.node_of_type(prompt, "TokenCache")
    _, sampler = wt.node_of_type(prompt, "KSampler")
    entry, log = server.run(prompt)
    assert entry["status"]["status_str"] == "success", (
        f"{name} failed: {json.dumps(execution_errors(entry), indent=1)[:6000]}\n{log[-4000:]}")
    summaries = TOKENCACHE_SUMMARY.findall(log)
    assert summaries, f"no TokenCache summary in the server log:\n{log[-4000:]}"
    scoring, steps, full, aggressive, conservative = summaries[-1]
    # every predictor file run here carries LoRA adapters (the shipped one, and those the workflow trains)
    expected_scoring = "fallback" if node["inputs"]["predictor"] == "none" else "learned+LoRA"
    assert (scoring, int(steps), int(full), int(aggressive), int(conservative)) == (
        expected_scoring, sampler["inputs"]["steps"], node["inputs"]["i_steps"], 0,
        sampler["inputs"]["steps"] - node["inputs"]["i_steps"]), summaries[-1]
    return entry


def test_train_then_use_predictor(server, object_info):
    """The train-predictor workflow writes models/token_cache/<name>.safetensors
    inside the server; the use-predictor workflow then runs with that file."""
    train = wt.ui_to_api(json.loads((REPO / "workflows" / "shapes_reference_train_predictor.json").read_text()), object_info)
    train_id, trainer = wt.node_of_type(train, TRAIN_NODE)
    # the file name comes through a link, as from a primitive node: validated with None, checked when it runs
    train["filename_source"] = {"class_type": "PrimitiveString", "inputs": {"value": "server_trained"}}
    # the workflow's LoRA refinement (rank 8 on the last 2 blocks) trains too: 6 steps leave 2 P-steps after 4 I-steps
    trainer["inputs"].update(iterations=4, steps=6, filename=["filename_source", 0])
    for node in train.values():
        if node["class_type"] == "TokenCacheShapesEmptyLatent":
            node["inputs"]["batch_size"] = 2
    entry, log = server.run(train)
    assert entry["status"]["status_str"] == "success", f"{json.dumps(execution_errors(entry), indent=1)[:6000]}\n{log[-4000:]}"
    written = server.models_dir / "token_cache" / "server_trained.safetensors"
    assert written.is_file(), (list((server.models_dir / "token_cache").glob("*")) if (server.models_dir / "token_cache").is_dir() else None, log[-3000:])
    info = server.get("/object_info/TokenCache")["TokenCache"]
    assert "server_trained.safetensors" in info["input"]["required"]["predictor"][1]["options"] or \
        "server_trained.safetensors" in info["input"]["required"]["predictor"][0]
    use = _tiny_prompt(object_info, REPO / "workflows" / "shapes_reference_tokencache.json")
    _, node = wt.node_of_type(use, "TokenCache")
    node["inputs"].update(predictor="server_trained.safetensors", i_steps=2)
    _run_tokencache_prompt(server, use, "train_then_use")
    # a missing file is refused at validation with the list of files; a broken one when it runs, with
    # a clear message; the server keeps running
    node["inputs"]["predictor"] = "no_such_predictor.safetensors"
    status, body = server.queue(use)
    assert status == 400 and "server_trained.safetensors" in json.dumps(body), body
    (written.parent / "broken.safetensors").write_bytes(written.read_bytes()[:100])
    node["inputs"]["predictor"] = "broken.safetensors"
    entry, _ = server.run(use)
    assert entry["status"]["status_str"] == "error"
    message = json.dumps(execution_errors(entry))
    assert "broken.safetensors" in message and "truncated" in message, message[:2000]
    node["inputs"].update(predictor="server_trained.safetensors", i_steps=3)   # new inputs: not served from cache
    _run_tokencache_prompt(server, use, "after_refusal")


def test_training_file_name_is_checked_at_validation_and_when_linked(server, object_info):
    train = wt.ui_to_api(json.loads((REPO / "workflows" / "shapes_reference_train_predictor.json").read_text()), object_info)
    train_id, trainer = wt.node_of_type(train, TRAIN_NODE)
    trainer["inputs"].update(iterations=2, steps=2)
    # typed in: refused at validation, the error on the filename input alone
    for bad in ("../../escaped", "nul\x00byte", "x" * 250):
        trainer["inputs"]["filename"] = bad
        status, body = server.queue(train)
        assert status == 400, (bad, body)
        errors = body["node_errors"][train_id]["errors"]
        assert [e["extra_info"]["input_name"] for e in errors] == ["filename"], errors
    # linked: validation cannot see it; the node refuses it before training, and nothing escapes the folder
    train["filename_source"] = {"class_type": "PrimitiveString", "inputs": {"value": "../../escaped"}}
    trainer["inputs"]["filename"] = ["filename_source", 0]
    entry, log = server.run(train)
    assert entry["status"]["status_str"] == "error", entry["status"]
    errors = execution_errors(entry)
    assert errors[0]["node_type"] == TRAIN_NODE and "plain file name" in errors[0]["exception_message"], errors
    assert not list(server.models_dir.parent.rglob("escaped*"))
    assert server.alive()


def test_checker_finds_mistakes(object_info):
    good = json.loads(DEV_DUCA.read_text())
    duca = next(n for n in good["nodes"] if n["type"] == "DuCaCache")
    index = good["nodes"].index(duca)

    def broken(values=None, node_type=None):
        workflow = copy.deepcopy(good)
        node = workflow["nodes"][index]
        if values is not None:
            node["widgets_values"] = values
        if node_type is not None:
            node["type"] = node_type
        return wt.check_ui_workflow(workflow, object_info)

    values = duca["widgets_values"]
    # seed's control value dropped: one value short of what the node's widgets take
    assert any(f"expected {len(values)}" in p for p in broken(values=values[:6] + values[7:]))
    assert any("selector" in p and "options" in p for p in broken(values=values[:2] + ["best"] + values[3:]))
    assert any("cycle_length" in p and "below min" in p for p in broken(values=values[:1] + [0] + values[2:]))
    assert any("cache_ratio" in p and "above max" in p for p in broken(values=[2.0] + values[1:]))
    assert any("seed control" in p for p in broken(values=values[:6] + ["sometimes"] + values[7:]))
    assert any("not known" in p for p in broken(node_type="NoSuchNode"))
    stale = copy.deepcopy(good)
    stale["last_link_id"] = 1
    assert any("last_link_id" in p for p in wt.check_ui_workflow(stale, object_info))
    with pytest.raises(ValueError):
        wt.ui_to_api(json.loads(json.dumps(good).replace('"DuCaCache"', '"NoSuchNode"')), object_info)


def test_converter_follows_reroutes_and_bypassed_nodes(object_info):
    workflow = json.loads(DEV_DUCA.read_text())
    nodes = {n["id"]: n for n in workflow["nodes"]}
    unet = next(n for n in workflow["nodes"] if n["type"] == "UNETLoader")
    duca = next(n for n in workflow["nodes"] if n["type"] == "DuCaCache")
    sampler = next(n for n in workflow["nodes"] if n["type"] == "KSampler")
    # UNETLoader -> Reroute -> DuCaCache, reusing the existing link for the first hop.
    link = next(l for l in workflow["links"] if l[1] == unet["id"] and l[3] == duca["id"])
    reroute_id, new_link = workflow["last_node_id"] + 1, workflow["last_link_id"] + 1
    workflow["nodes"].append({"id": reroute_id, "type": "Reroute", "pos": [400, 0], "size": [75, 26], "flags": {},
                              "order": 0, "mode": 0, "inputs": [{"name": "", "type": "*", "link": link[0]}],
                              "outputs": [{"name": "", "type": "MODEL", "links": [new_link]}], "properties": {}})
    link[3], link[4] = reroute_id, 0
    duca["inputs"][0]["link"] = new_link
    workflow["links"].append([new_link, reroute_id, 0, duca["id"], 0, "MODEL"])
    workflow["last_node_id"], workflow["last_link_id"] = reroute_id, new_link
    assert wt.check_ui_workflow(workflow, object_info) == []
    api = wt.ui_to_api(workflow, object_info)
    assert str(reroute_id) not in api
    assert api[str(duca["id"])]["inputs"]["model"] == [str(unet["id"]), 0]

    nodes[duca["id"]]["mode"] = wt.BYPASSED
    api = wt.ui_to_api(workflow, object_info)
    assert str(duca["id"]) not in api
    assert api[str(sampler["id"])]["inputs"]["model"] == [str(unet["id"]), 0]


@pytest.mark.parametrize("name,value", [("cycle_length", 0), ("cache_ratio", 2.0)])
def test_out_of_range_setting_is_refused(name, value, server, object_info):
    prompt = _tiny_prompt(object_info, DEV_DUCA, prefix="refused", **{name: value})
    duca_id, _ = wt.node_of_type(prompt, "DuCaCache")
    status, body = server.queue(prompt)
    assert status == 400, f"HTTP {status}: {body}"
    errors = body["node_errors"][duca_id]["errors"]
    assert any(e.get("extra_info", {}).get("input_name") == name for e in errors), errors
    assert server.alive()


def test_invalid_settings_report_a_clear_error_and_the_server_recovers(server, object_info):
    # Each value is in range, so validation passes; the node itself must refuse the pair.
    prompt = _tiny_prompt(object_info, DEV_DUCA, prefix="bad_window", start_percent=0.8, end_percent=0.2)
    entry, log = server.run(prompt)
    assert entry["status"]["status_str"] == "error", entry["status"]
    errors = execution_errors(entry)
    assert errors and errors[0]["node_type"] == "DuCaCache", errors
    assert "start_percent" in errors[0]["exception_message"], errors[0]["exception_message"]
    assert server.alive()

    assert "DuCaCache" in server.get("/object_info")
    prompt = _tiny_prompt(object_info, DEV_DUCA, prefix="after_error", seed=7)
    entry, log = server.run(prompt)
    assert entry["status"]["status_str"] == "success", json.dumps(execution_errors(entry), indent=1)[:6000]
