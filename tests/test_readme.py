"""The README's tables are true: the settings table is the DuCa node's own
widgets and defaults, the recommended starts are what the shipped workflows
use, the memory table is what scripts/cache_memory.py computes, and every
test the compatibility table names exists."""
import json
import re

import pytest

from cache_memory import table as memory_table
from conftest import REPO

from dit_token_cache.nodes.duca_node import DuCaCacheNode

README = (REPO / "README.md").read_text()
# README family row -> the shipped workflows whose DuCa settings it recommends
FAMILY_WORKFLOWS = {
    "Flux.1 dev": ["flux_dev_t2i_duca"],
    "Flux.1 schnell": ["flux_schnell_t2i_duca"],
    "Wan 2.1 / 2.2 (t2v, i2v, TI2V 5B)": ["wan21_t2v_duca", "wan21_i2v_duca"],
    "Qwen-Image (and Edit, Layered)": ["qwen_image_t2i_duca"],
    "SD3 / SD3.5 (Large, Medium)": ["sd35_t2i_duca"],
    "PixArt-alpha / Sigma": ["pixart_sigma_t2i_duca"],
}


def _table_after(heading_text: str) -> list:
    """Rows (lists of cells) of the first Markdown table after `heading_text`."""
    rest = README[README.index(heading_text):]
    lines = [line for line in rest.splitlines() if line.startswith("|")]
    start = rest.splitlines().index(lines[0])
    rows = []
    for line in rest.splitlines()[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows[2:]   # past the header and the separator


def _duca_widgets():
    schema = DuCaCacheNode.define_schema()
    return [(i.id, i.default) for i in schema.inputs if i.id != "model"]


def _readme_value(text: str):
    text = text.strip("`")
    try:
        return json.loads(text)
    except ValueError:
        return text


def test_settings_table_is_the_nodes_widgets_and_defaults():
    rows = _table_after("Settings, in widget order:")
    documented = []
    for name_cell, default_cell, _ in rows:
        names = re.findall(r"`([a-z_]+)`", name_cell)
        defaults = [d.strip() for d in default_cell.split(",")]
        assert len(names) == len(defaults), name_cell
        documented += [(n, _readme_value(d)) for n, d in zip(names, defaults)]
    assert documented == _duca_widgets()


def _duca_settings(workflow: str) -> dict:
    nodes = json.loads((REPO / "workflows" / f"{workflow}.json").read_text())["nodes"]
    (duca,) = [n for n in nodes if n["type"] == "DuCaCache"]
    names = [n for n, _ in _duca_widgets()]
    values = [v for v in duca["widgets_values"] if v not in ("fixed", "increment", "decrement", "randomize")]
    return dict(zip(names, values))


@pytest.mark.parametrize("family", sorted(FAMILY_WORKFLOWS))
def test_recommended_starts_are_what_the_workflows_use(family):
    rows = {row[0]: row for row in _table_after("## Supported models")}
    recommended = dict(re.findall(r"`([a-z_]+) ([\w.]+)`", rows[family][2]))
    assert recommended, rows[family]
    for workflow in FAMILY_WORKFLOWS[family]:
        used = _duca_settings(workflow)
        assert {k: used[k] for k in recommended} == {k: _readme_value(v) for k, v in recommended.items()}, (workflow, used)


def test_memory_table_is_what_the_script_computes():
    computed = memory_table().splitlines()
    assert computed and all(row in README for row in computed), [row for row in computed if row not in README]


def test_compatibility_rows_name_tests_that_exist():
    rows = _table_after("## Works with")
    assert len(rows) >= 8
    for row in rows:
        for path in re.findall(r"`(tests/[\w/]+\.py)`", row[2]):
            assert (REPO / path).is_file(), path


def test_every_workflow_has_a_template_thumbnail():
    """ComfyUI's template browser shows <name>.jpg beside <name>.json."""
    from PIL import Image
    workflows = sorted((REPO / "workflows").glob("*.json"))
    assert workflows
    for path in workflows:
        with Image.open(path.with_suffix(".jpg")) as image:
            assert image.format == "JPEG" and image.size == (512, 512), path
    assert sorted(p.stem for p in (REPO / "workflows").glob("*.jpg")) == [p.stem for p in workflows]


LOADER_FOLDERS = {"UNETLoader": "diffusion_models", "CLIPLoader": "text_encoders", "DualCLIPLoader": "text_encoders",
                  "TripleCLIPLoader": "text_encoders", "VAELoader": "vae", "CLIPVisionLoader": "clip_vision"}


@pytest.mark.parametrize("path", sorted((REPO / "workflows").glob("*.json")), ids=lambda p: p.stem)
def test_real_model_workflows_say_what_to_download(path):
    """Every model file a real-model workflow loads has ComfyUI's download
    metadata on its loader (an https Hugging Face link into the loader's
    folder) or is named, with where to get it, in the workflow's Note."""
    nodes = json.loads(path.read_text())["nodes"]
    loaders = [n for n in nodes if n["type"] in LOADER_FOLDERS]
    if not loaders:
        return   # the reference-model workflows load nothing from disk
    (note,) = [n["widgets_values"][0] for n in nodes if n["type"] == "Note"]
    for loader in loaders:
        files = [v for v in loader["widgets_values"] if isinstance(v, str) and v.endswith(".safetensors")]
        linked = {m["name"]: m for m in loader.get("properties", {}).get("models", [])}
        for name in files:
            assert name in note, (path.stem, name)
            if name in linked:
                assert linked[name]["url"].startswith("https://huggingface.co/") and \
                    linked[name]["url"].split("?")[0].endswith("/" + name), linked[name]
                assert linked[name]["directory"] == LOADER_FOLDERS[loader["type"]], linked[name]
            else:
                assert "huggingface" in note.lower() or "Hugging Face" in note, (path.stem, name)
