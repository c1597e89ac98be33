"""Custom ComfyUI socket types of this pack (names are part of the public contract)."""
from comfy_api.latest import io

LIDB = io.Custom("LIDB")
HYPERNET = io.Custom("HYPERNET")

CATEGORY = "HyperDreamBooth"
