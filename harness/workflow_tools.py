"""Check ComfyUI UI-format workflows against a server's /object_info, convert them to
API-format prompts, and make them runnable on a tiny test checkpoint.

The rules follow the web frontend (comfyui-frontend-package 1.47) rather than guesses:

* Every required/optional input whose type is INT, FLOAT, STRING, BOOLEAN or COMBO (V3
  spelling, or a legacy list of options) is a widget unless it sets ``forceInput``.
  A widget keeps its slot in ``widgets_values`` even when a link drives it (the link then
  wins in the API prompt).
* Control widgets ("control after generate") are saved in ``widgets_values`` right after the
  widget they control, but are not sent to the server:
    - INT: when ``control_after_generate`` is set, or when the key is absent and the input is
      named ``seed`` or ``noise_seed`` (the frontend adds one by name for legacy nodes);
      one extra value, one of fixed/increment/decrement/randomize.
    - FLOAT: when ``control_after_generate`` is set; one extra value.
    - COMBO: when ``control_after_generate`` is set; two extra values (the control, which may
      also be "increment-wrap", and a filter-list string).
* COMBO inputs with ``image_upload`` (LoadImage & co.) carry one extra value for the
  upload button.

Model file names (values ending in a model-file extension) are not checked against the
combo options: the server that checks a workflow rarely has the real checkpoints.
``model_files()`` lists them instead.
"""
from __future__ import annotations

import copy
import json
import urllib.request
from dataclasses import dataclass
from typing import Any

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
COMBO_CONTROL_VALUES = CONTROL_VALUES + ("increment-wrap",)
SEED_NAMES = ("seed", "noise_seed")
MODEL_EXTENSIONS = (".safetensors", ".sft", ".ckpt", ".pt", ".pt2", ".pth", ".bin", ".pkl", ".gguf")
# Frontend-only nodes: never sent to the server.
VIRTUAL_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
MUTED, BYPASSED = 2, 4

# Node types whose CLIP input turns text into a conditioning; substitute_tiny_model replaces
# them by LotusConditioning.
TEXT_ENCODE_NODES = {"CLIPTextEncode", "CLIPTextEncodeFlux", "CLIPTextEncodeSD3", "CLIPTextEncodeSDXL"}
CLIP_LOADERS = {"CLIPLoader", "DualCLIPLoader", "TripleCLIPLoader", "QuadrupleCLIPLoader"}
VAE_LOADERS = {"VAELoader"}
IMAGE_SINKS = {"SaveImage", "PreviewImage", "SaveAnimatedWEBP", "SaveWEBM"}
# Image-to-video nodes -> the empty-latent node that makes the latent they make; the image
# nodes that feed them are dropped (see substitute_tiny_model).
IMAGE_TO_VIDEO_NODES = {"WanImageToVideo": "EmptyHunyuanLatentVideo"}
IMAGE_INPUT_NODES = {"LoadImage", "CLIPVisionLoader", "CLIPVisionEncode"}
LATENT_SOURCES = {"EmptySD3LatentImage", "EmptyLatentImage", "EmptyHunyuanLatentVideo", "EmptyFlux2LatentImage"}
SAMPLERS_WITH_STEPS = {"KSampler", "KSamplerAdvanced", "BasicScheduler", "Flux2Scheduler"}


# --------------------------------------------------------------------------- object_info


def load_object_info(source: str | dict | None = None, timeout: float = 30.0) -> dict:
    """Node definitions: `source` is a dict (returned as is) or a server URL such as
    "http://127.0.0.1:8188" (GET /object_info)."""
    if isinstance(source, dict):
        return source
    if not source:
        raise ValueError("load_object_info needs a server URL or an object_info dict")
    with urllib.request.urlopen(source.rstrip("/") + "/object_info", timeout=timeout) as response:
        return json.loads(response.read())


@dataclass(frozen=True)
class WidgetSpec:
    name: str
    kind: str  # INT, FLOAT, STRING, BOOLEAN or COMBO
    options: dict
    choices: tuple | None  # COMBO options
    optional: bool
    extra: tuple  # kinds of the saved-but-not-sent values that follow: "control", "filter", "upload"


def _input_specs(node_def: dict):
    """(name, spec, optional) for required then optional inputs, in the server's order."""
    inputs = node_def.get("input", {})
    order = node_def.get("input_order", {})
    for section in ("required", "optional"):
        specs = inputs.get(section) or {}
        names = order.get(section) or list(specs)
        for name in names:
            if name in specs:
                yield name, specs[name], section == "optional"


def _kind(spec) -> tuple[str, dict, tuple | None]:
    """(type, options, combo choices) of one input spec."""
    type_ = spec[0] if spec else None
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if isinstance(type_, list):
        return "COMBO", options, tuple(type_)
    if type_ == "COMBO":
        return "COMBO", options, tuple(options.get("options") or ())
    return type_, options, None


def widget_specs(node_def: dict) -> list[WidgetSpec]:
    """The node's widgets in the order the frontend saves them."""
    widgets = []
    for name, spec, optional in _input_specs(node_def):
        kind, options, choices = _kind(spec)
        if not isinstance(kind, str) or kind not in WIDGET_TYPES or options.get("forceInput"):
            continue
        control = options.get("control_after_generate")
        extra: tuple = ()
        if kind == "INT" and (control or (control is None and name in SEED_NAMES)):
            extra = ("control",)
        elif kind == "FLOAT" and control:
            extra = ("control",)
        elif kind == "COMBO" and control:
            extra = ("control", "filter")
        if kind == "COMBO" and options.get("image_upload"):
            extra += ("upload",)
        widgets.append(WidgetSpec(name, kind, options, choices, optional, extra))
    return widgets


def socket_inputs(node_def: dict) -> dict:
    """Non-widget inputs: name -> (type, optional)."""
    widget_names = {w.name for w in widget_specs(node_def)}
    return {name: (spec[0], optional) for name, spec, optional in _input_specs(node_def) if name not in widget_names}


def default_control(spec: WidgetSpec) -> str:
    """The control value the frontend puts after a new widget."""
    control = spec.options.get("control_after_generate")
    return control if isinstance(control, str) else "randomize"


def is_model_file(value) -> bool:
    return isinstance(value, str) and value.lower().endswith(MODEL_EXTENSIONS)


# --------------------------------------------------------------------------- checking


def _check_value(spec: WidgetSpec, value) -> str | None:
    """Why `value` is not valid for the widget, or None."""
    o = spec.options
    if spec.kind == "INT":
        if isinstance(value, bool) or not isinstance(value, int):
            return f"{value!r} is not an integer"
    elif spec.kind == "FLOAT":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{value!r} is not a number"
    elif spec.kind == "STRING":
        if not isinstance(value, str):
            return f"{value!r} is not a string"
    elif spec.kind == "BOOLEAN":
        if not isinstance(value, bool):
            return f"{value!r} is not a boolean"
    elif spec.kind == "COMBO":
        if o.get("multiselect"):
            values = value if isinstance(value, list) else [value]
        else:
            values = [value]
        for v in values:
            if is_model_file(v):
                continue  # checked by model_files(), not against this server's folders
            if spec.choices is not None and v not in spec.choices:
                shown = ", ".join(map(repr, spec.choices[:12])) + (" ..." if len(spec.choices) > 12 else "")
                return f"{v!r} is not one of the options ({shown})"
    if spec.kind in ("INT", "FLOAT"):
        if "min" in o and value < o["min"]:
            return f"{value!r} is below min {o['min']}"
        if "max" in o and value > o["max"]:
            return f"{value!r} is above max {o['max']}"
    return None


def _check_extra(kind: str, value) -> str | None:
    if kind == "control":
        if value not in COMBO_CONTROL_VALUES:
            return f"control value {value!r} is not one of {', '.join(CONTROL_VALUES)}"
    elif kind == "filter":
        if not isinstance(value, str):
            return f"control filter {value!r} is not a string"
    return None


def _links_by_id(workflow: dict) -> dict:
    """link id -> (from_node, from_slot, to_node, to_slot, type); accepts list or dict links."""
    table = {}
    for link in workflow.get("links") or []:
        if isinstance(link, dict):
            table[link["id"]] = (link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"], link.get("type"))
        else:
            table[link[0]] = tuple(link[1:6])
    return table


def _types_match(a, b) -> bool:
    if a in ("*", None) or b in ("*", None):
        return True
    sa = set(str(a).split(","))
    sb = set(str(b).split(","))
    return bool(sa & sb)


NODE_FIELDS = {"id": (int, str), "type": str, "pos": (list, dict), "size": (list, dict), "flags": dict,
               "order": int, "mode": int, "properties": dict}


def _check_structure(workflow: dict) -> list[str]:
    """The fields the frontend's schema for version-0.4 workflows requires."""
    problems = []
    if not isinstance(workflow.get("version"), (int, float)):
        problems.append("workflow has no numeric 'version'")
    for key in ("last_node_id", "last_link_id"):
        if key not in workflow:
            problems.append(f"workflow has no '{key}'")
    node_ids = [n.get("id") for n in workflow["nodes"] if isinstance(n.get("id"), int)]
    link_ids = [l[0] if isinstance(l, list) else l.get("id") for l in workflow["links"]]
    if node_ids and isinstance(workflow.get("last_node_id"), int) and workflow["last_node_id"] < max(node_ids):
        problems.append(f"last_node_id {workflow['last_node_id']} is below the highest node id {max(node_ids)}")
    if link_ids and isinstance(workflow.get("last_link_id"), int) and workflow["last_link_id"] < max(link_ids):
        problems.append(f"last_link_id {workflow['last_link_id']} is below the highest link id {max(link_ids)}")
    for node in workflow["nodes"]:
        for key, types in NODE_FIELDS.items():
            if not isinstance(node.get(key), types):
                problems.append(f"node {node.get('id')} ({node.get('type')}): field '{key}' missing or of the wrong type")
    for link in workflow["links"]:
        if isinstance(link, list) and len(link) != 6:
            problems.append(f"link {link}: expected [id, from_node, from_slot, to_node, to_slot, type]")
    return problems


def check_ui_workflow(workflow: dict, object_info: dict) -> list[str]:
    """Problems found in a UI-format workflow; an empty list means it is valid for this server."""
    problems: list[str] = []
    for key in ("nodes", "links"):
        if not isinstance(workflow.get(key), list):
            problems.append(f"workflow has no '{key}' list (is this an API-format prompt?)")
    if problems:
        return problems
    problems.extend(_check_structure(workflow))
    nodes = {}
    for node in workflow["nodes"]:
        if node.get("id") in nodes:
            problems.append(f"node id {node.get('id')} is used twice")
        nodes[node.get("id")] = node
    links = _links_by_id(workflow)

    for link_id, (src, src_slot, dst, dst_slot, ltype) in links.items():
        where = f"link {link_id}"
        if src not in nodes or dst not in nodes:
            problems.append(f"{where}: connects missing node(s) {src} -> {dst}")
            continue
        outputs = nodes[src].get("outputs") or []
        inputs = nodes[dst].get("inputs") or []
        if not 0 <= src_slot < len(outputs):
            problems.append(f"{where}: node {src} has no output slot {src_slot}")
        elif link_id not in (outputs[src_slot].get("links") or []):
            problems.append(f"{where}: not listed in node {src} output {src_slot} links")
        elif not _types_match(outputs[src_slot].get("type"), ltype):
            problems.append(f"{where}: type {ltype} but node {src} output {src_slot} is {outputs[src_slot].get('type')}")
        if not 0 <= dst_slot < len(inputs):
            problems.append(f"{where}: node {dst} has no input slot {dst_slot}")
        elif inputs[dst_slot].get("link") != link_id:
            problems.append(f"{where}: node {dst} input {dst_slot} ({inputs[dst_slot].get('name')}) does not point back to it")
        elif not _types_match(inputs[dst_slot].get("type"), ltype):
            problems.append(f"{where}: type {ltype} but node {dst} input {inputs[dst_slot].get('name')} is {inputs[dst_slot].get('type')}")

    for node_id, node in nodes.items():
        ntype = node.get("type")
        where = f"node {node_id} ({ntype})"
        if ntype in VIRTUAL_NODES:
            continue
        node_def = object_info.get(ntype)
        if node_def is None:
            problems.append(f"{where}: node type is not known to the server")
            continue
        for inp in node.get("inputs") or []:
            if inp.get("link") is not None and inp["link"] not in links:
                problems.append(f"{where}: input {inp.get('name')} points to missing link {inp['link']}")

        specs = widget_specs(node_def)
        unsupported = [name for name, spec, _ in _input_specs(node_def)
                       if isinstance(spec[0], str) and spec[0].startswith("COMFY_") and spec[0].endswith("_V3")]
        if unsupported:
            problems.append(f"{where}: dynamic inputs {unsupported} cannot be checked")
            continue
        expected = []
        for s in specs:
            expected.append((s, None))
            expected.extend((s, kind) for kind in s.extra)
        values = node.get("widgets_values")
        if values is None:
            values = []
        if isinstance(values, dict):
            problems.append(f"{where}: widgets_values is a dict; only list-style widgets_values are supported")
            continue
        layout = [s.name if k is None else f"{s.name}:{k}" for s, k in expected]
        count = f"{where}: {len(values)} widgets_values, expected {len(expected)}: {layout}"
        # a file saved before trailing widgets were added loads with their defaults, as in the frontend
        missing = expected[len(values):]
        if len(values) > len(expected) or any(k is not None or "default" not in s.options for s, k in missing):
            problems.append(count)
            continue
        wrong = []
        for (spec, kind), value in zip(expected, values):
            reason = _check_value(spec, value) if kind is None else _check_extra(kind, value)
            if reason:
                wrong.append(f"{where}: widget {spec.name}{'' if kind is None else ' ' + kind}: {reason}")
        if wrong and missing:
            wrong.insert(0, count + " (a value missing in the middle shifts the ones after it)")
        problems.extend(wrong)

        linked = {inp.get("name") for inp in node.get("inputs") or [] if inp.get("link") is not None}
        for name, (type_, optional) in socket_inputs(node_def).items():
            if not optional and name not in linked:
                problems.append(f"{where}: required input {name} ({type_}) is not connected")
    return problems


def model_files(workflow: dict, object_info: dict) -> list[tuple[int, str, str, str]]:
    """(node id, node type, input name, file name) of every model file a workflow loads."""
    found = []
    for node in workflow.get("nodes") or []:
        node_def = object_info.get(node.get("type"))
        if node_def is None or node.get("type") in VIRTUAL_NODES:
            continue
        values = iter(node.get("widgets_values") or [])
        for spec in widget_specs(node_def):
            value = next(values, None)
            for _ in spec.extra:
                next(values, None)
            if spec.kind == "COMBO" and is_model_file(value):
                found.append((node["id"], node["type"], spec.name, value))
    return found


# --------------------------------------------------------------------------- conversion


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """API-format prompt {node_id: {"class_type", "inputs", "_meta"}} of a UI-format workflow.

    Widget values are mapped positionally (control values skipped), links become
    [source_id, output_slot]. Muted nodes and frontend-only nodes are left out; links through
    Reroutes and bypassed nodes are followed the way the frontend does (a bypassed node
    passes on its first input of the same type as the output used).
    """
    problems = check_ui_workflow(workflow, object_info)
    if problems:
        raise ValueError("workflow is not valid for this server:\n  " + "\n  ".join(problems))
    nodes = {node["id"]: node for node in workflow["nodes"]}
    links = _links_by_id(workflow)

    def source(link_id, seen=()):
        """(node id, slot) that really produces a link's value, or None when nothing does."""
        src, slot, _, _, ltype = links[link_id]
        node = nodes[src]
        if src in seen:
            raise ValueError(f"link cycle through node {src}")
        if node["type"] == "Reroute" or node.get("mode") == BYPASSED:
            out_type = (node.get("outputs") or [{}])[slot].get("type", ltype) if node.get("outputs") else ltype
            for inp in node.get("inputs") or []:
                if inp.get("link") is not None and (node["type"] == "Reroute" or _types_match(inp.get("type"), out_type)):
                    return source(inp["link"], seen + (src,))
            return None
        if node["type"] == "PrimitiveNode" or node.get("mode") == MUTED:
            return None
        return str(src), slot

    prompt = {}
    for node_id, node in nodes.items():
        if node["type"] in VIRTUAL_NODES or node.get("mode") in (MUTED, BYPASSED):
            continue
        node_def = object_info[node["type"]]
        inputs: dict[str, Any] = {}
        values = list(node.get("widgets_values") or [])
        position = 0
        for spec in widget_specs(node_def):
            # widgets added after the file was saved take their defaults
            inputs[spec.name] = values[position] if position < len(values) else spec.options["default"]
            position += 1 + len(spec.extra)
        for inp in node.get("inputs") or []:
            if inp.get("link") is None:
                continue
            src = source(inp["link"])
            if src is None:
                continue  # a primitive's value is already in the target widget
            inputs[inp["name"]] = [src[0], src[1]]
        prompt[str(node_id)] = {
            "class_type": node["type"],
            "inputs": inputs,
            "_meta": {"title": node.get("title") or node_def.get("display_name") or node["type"]},
        }
    return prompt


def node_of_type(prompt: dict, class_type: str) -> tuple[str, dict]:
    """(id, node) of the one node of `class_type` in an API prompt."""
    found = [(nid, node) for nid, node in prompt.items() if node["class_type"] == class_type]
    if len(found) != 1:
        raise ValueError(f"expected one {class_type}, found {len(found)}")
    return found[0]


def _consumers(prompt: dict, node_id: str):
    """(consumer id, input name, slot) of every input linked to `node_id`."""
    for cid, node in prompt.items():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and str(value[0]) == node_id:
                yield cid, name, value[1]


def substitute_tiny_model(api_prompt: dict, unet_name: str, width: int = 64, height: int = 64,
                          steps: int | None = 6, filename_prefix: str = "latents/dtc_test",
                          text_dataset: str | None = None, length: int = 5) -> dict:
    """A copy of an API prompt that runs on a tiny diffusion model with no text encoder or VAE.

    * UNETLoader loads `unet_name` (weight_dtype kept);
    * text encoders fed by a CLIP loader become LotusConditioning (a fixed [1, 77, 1024]
      conditioning, no inputs), or, given `text_dataset`, the conditioning of LoadTrainingDataset
      reading that dataset folder (for models whose text width detection fixes at another
      width, or that need a pooled output: SD3); the CLIP and VAE loaders are dropped;
    * each VAEDecode and the SaveImage/PreviewImage nodes it feeds become one SaveLatent
      (saved under `filename_prefix`);
    * an image-to-video node (WanImageToVideo) gives what it gives with no start image and no
      CLIP vision output: its positive and negative pass through unchanged, and its zero latent
      comes from the empty-latent node of the same shape (EmptyHunyuanLatentVideo). Its VAE,
      image and CLIP vision inputs have no tiny stand-in (detection pins the CLIP vision
      encoder at full size), so LoadImage and the CLIP vision nodes are dropped, and ComfyUI's
      model fills the image channels with zeros, as it does when that node has no image. The
      image path itself (concat latent, CLIP image tokens) is tested on the tiny i2v model in
      tests/test_families_modulewise.py;
    * empty latents are shrunk to width x height (videos to `length` frames), sampler steps
      capped at `steps` (None: kept);
    * everything else, DuCaCache and its settings included, is kept as is.
    """
    prompt = copy.deepcopy(api_prompt)

    for node in prompt.values():
        if node["class_type"] == "UNETLoader":
            node["inputs"]["unet_name"] = unet_name

    removed = set()
    for nid, node in list(prompt.items()):
        if node["class_type"] in CLIP_LOADERS:
            for cid, name, _ in list(_consumers(prompt, nid)):
                consumer = prompt[cid]
                if consumer["class_type"] not in TEXT_ENCODE_NODES:
                    raise ValueError(f"node {cid} ({consumer['class_type']}) takes CLIP from {nid}: no tiny substitute known")
                meta = {"title": f"{consumer.get('_meta', {}).get('title', consumer['class_type'])} (tiny)"}
                if text_dataset is None:
                    prompt[cid] = {"class_type": "LotusConditioning", "inputs": {}, "_meta": meta}
                    continue
                prompt[cid] = {"class_type": "LoadTrainingDataset", "inputs": {"folder_name": text_dataset}, "_meta": meta}
                for uid, input_name, _ in list(_consumers(prompt, cid)):
                    prompt[uid]["inputs"][input_name] = [cid, 1]   # its conditioning output
            removed.add(nid)

    for nid, node in list(prompt.items()):
        if node["class_type"] != "VAEDecode":
            continue
        samples = node["inputs"]["samples"]
        consumers = list(_consumers(prompt, nid))
        for cid, _, _ in consumers:
            if prompt[cid]["class_type"] not in IMAGE_SINKS:
                raise ValueError(f"node {cid} ({prompt[cid]['class_type']}) uses the decoded image of {nid}: no tiny substitute known")
        target = consumers[0][0] if consumers else nid
        for cid, _, _ in consumers:
            removed.add(cid)
        removed.add(nid)
        removed.discard(target)
        prompt[target] = {"class_type": "SaveLatent", "inputs": {"samples": samples, "filename_prefix": filename_prefix},
                          "_meta": {"title": "Save Latent (tiny)"}}

    for nid, node in list(prompt.items()):
        latent_node = IMAGE_TO_VIDEO_NODES.get(node["class_type"])
        if latent_node is None:
            continue
        inputs = node["inputs"]
        for cid, name, slot in list(_consumers(prompt, nid)):
            # outputs: positive, negative, latent
            prompt[cid]["inputs"][name] = inputs[("positive", "negative")[slot]] if slot < 2 else [nid, 0]
        prompt[nid] = {"class_type": latent_node,
                       "inputs": {key: inputs[key] for key in ("width", "height", "length", "batch_size")},
                       "_meta": {"title": f"{node.get('_meta', {}).get('title', node['class_type'])} (tiny, no image)"}}

    for nid, node in prompt.items():
        if node["class_type"] in VAE_LOADERS or node["class_type"] in IMAGE_INPUT_NODES:
            removed.add(nid)
    for nid in removed:
        prompt.pop(nid, None)

    for nid, node in prompt.items():
        inputs = node["inputs"]
        if node["class_type"] in LATENT_SOURCES:
            for key, value in (("width", width), ("height", height), ("length", length)):
                if key in inputs and not isinstance(inputs[key], list):
                    inputs[key] = value
        if steps is not None and node["class_type"] in SAMPLERS_WITH_STEPS and isinstance(inputs.get("steps"), int):
            inputs["steps"] = min(inputs["steps"], steps)
        for name, value in inputs.items():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and value[0] not in prompt:
                raise ValueError(f"node {nid} ({node['class_type']}) input {name} still uses removed node {value[0]}")
    return prompt
