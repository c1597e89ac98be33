"""ComfyUI-HyperDreamBooth: one face photo in, a ~100 KB identity (LiDB) out.

ComfyUI imports this file; nodes are declared with the V3 schema in nodes/ and
the maths lives in hdb_core/ (plain torch, usable without ComfyUI).
"""
from .nodes import comfy_entrypoint

__all__ = ["comfy_entrypoint"]
