"""ComfyUI-HyperDreamBooth: one face photo in, a ~120 KB identity (LiDB) out.

ComfyUI imports this file; nodes are declared with the V3 schema in nodes/ and
the maths lives in hdb_core/ (plain torch, usable without ComfyUI).
"""
import importlib.util
import os
import sys


def _import_core_once() -> None:
    """Make this folder's hdb_core importable as the top-level `hdb_core`.

    The CLI, benches and tests import `hdb_core`; the nodes do too, so every
    process holds one copy of its classes (an HDBError raised by a node is the
    HDBError a caller catches). sys.path is left alone.
    """
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hdb_core")
    loaded = sys.modules.get("hdb_core")
    if loaded is not None:
        if os.path.dirname(os.path.abspath(loaded.__file__)) != here:
            raise ImportError(f"another package named hdb_core is already imported from {loaded.__file__}; "
                              f"HyperDreamBooth needs its own (in {here}).")
        return
    spec = importlib.util.spec_from_file_location("hdb_core", os.path.join(here, "__init__.py"),
                                                  submodule_search_locations=[here])
    module = importlib.util.module_from_spec(spec)
    sys.modules["hdb_core"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["hdb_core"]
        raise


# Outside ComfyUI (pytest collecting this folder, packaging tools) there is nothing to register.
if importlib.util.find_spec("comfy_api") is not None:
    _import_core_once()
    from .nodes import comfy_entrypoint

    __all__ = ["comfy_entrypoint"]
