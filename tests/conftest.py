"""Tests run against the real pinned ComfyUI (scripts/setup_env.sh puts it in
.dtc/ComfyUI and writes DTC_COMFYUI; `make test` exports it)."""
import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMFYUI = Path(os.environ.get("DTC_COMFYUI", REPO / ".dtc" / "ComfyUI")).resolve()
PACKAGE = "dit_token_cache"

if not (COMFYUI / "comfy").is_dir():
    raise RuntimeError(f"No ComfyUI at {COMFYUI}: run `make test` (it sets one up) or set DTC_COMFYUI")

for path in (str(COMFYUI), str(REPO / "scripts")):
    if path not in sys.path:
        sys.path.insert(0, path)

from comfy.cli_args import args  # noqa: E402

args.cpu = True


def _import_pack():
    """The pack as ComfyUI sees it: a package directory loaded by path."""
    if PACKAGE in sys.modules:
        return sys.modules[PACKAGE]
    spec = importlib.util.spec_from_file_location(PACKAGE, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    spec.loader.exec_module(module)
    return module


_import_pack()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """Tiny checkpoints are cached per machine: building them is deterministic."""
    path = Path(os.environ.get("DTC_MODEL_CACHE", REPO / ".dtc" / "models"))
    path.mkdir(parents=True, exist_ok=True)
    return path
