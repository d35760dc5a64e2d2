"""Import this pack the way ComfyUI does: its directory loaded by path as a
package (named dit_token_cache here), so relative imports work from any
checkout directory name. With comfy (the default) its ComfyUI side is
imported too, so ComfyUI must already be importable; without, only the
package (enough for dit_token_cache.diffusers, accel_core, reference)."""
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "dit_token_cache"


def import_pack(comfy: bool = True):
    module = sys.modules.get(PACKAGE)
    if module is None:
        spec = importlib.util.spec_from_file_location(PACKAGE, REPO / "__init__.py",
                                                      submodule_search_locations=[str(REPO)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = module
        spec.loader.exec_module(module)
    if comfy:
        importlib.import_module(f"{PACKAGE}.nodes.patcher")
    return module
