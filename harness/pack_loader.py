"""Import this pack the way ComfyUI does: its directory loaded by path as a
package (named dit_token_cache here), so relative imports work from any
checkout directory name. ComfyUI must already be importable."""
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "dit_token_cache"


def import_pack():
    if PACKAGE in sys.modules:
        return sys.modules[PACKAGE]
    spec = importlib.util.spec_from_file_location(PACKAGE, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    spec.loader.exec_module(module)
    importlib.import_module(f"{PACKAGE}.nodes.patcher")
    return module
