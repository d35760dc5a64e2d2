"""Tests run against the real pinned ComfyUI (scripts/setup_env.sh puts it in
.dtc/ComfyUI and writes DTC_COMFYUI; `make test` exports it)."""
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMFYUI = Path(os.environ.get("DTC_COMFYUI", REPO / ".dtc" / "ComfyUI")).resolve()

if not (COMFYUI / "comfy").is_dir():
    raise RuntimeError(f"No ComfyUI at {COMFYUI}: run `make test` (it sets one up) or set DTC_COMFYUI")

for path in (str(COMFYUI), str(REPO / "harness"), str(REPO / "scripts")):
    if path not in sys.path:
        sys.path.insert(0, path)

from comfy.cli_args import args  # noqa: E402

args.cpu = True

from pack_loader import import_pack  # noqa: E402

import_pack()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """Tiny checkpoints are cached per machine: building them is deterministic."""
    path = Path(os.environ.get("DTC_MODEL_CACHE", REPO / ".dtc" / "models"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def tiny_model(model_dir):
    """family -> ComfyUI MODEL of its tiny checkpoint, loaded through ComfyUI's detection."""
    import tiny_models

    def load(family):
        return tiny_models.load(family, tiny_models.build_checkpoint(family, model_dir / f"{family}_tiny.safetensors"))
    return load


@pytest.fixture(scope="module")
def predictor_dir(tmp_path_factory):
    """models/token_cache pointed at a fresh folder for the test module, restored after."""
    import folder_paths
    from dit_token_cache.nodes.tokencache_nodes import FOLDER
    folder = tmp_path_factory.mktemp("token_cache")
    paths, extensions = folder_paths.folder_names_and_paths[FOLDER]
    folder_paths.folder_names_and_paths[FOLDER] = ([str(folder)], extensions)
    yield folder
    folder_paths.folder_names_and_paths[FOLDER] = (paths, extensions)
