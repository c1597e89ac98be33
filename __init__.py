"""ComfyUI-HyperDreamBooth: one face photo in, a ~100 KB identity (LiDB) out.

ComfyUI imports this file; nodes are declared with the V3 schema in nodes/ and
the maths lives in hdb_core/ (plain torch, usable without ComfyUI).
"""
import importlib.util

# Outside ComfyUI (pytest collecting this folder, packaging tools) there is nothing to register.
if importlib.util.find_spec("comfy_api") is not None:
    from .nodes import comfy_entrypoint

    __all__ = ["comfy_entrypoint"]
