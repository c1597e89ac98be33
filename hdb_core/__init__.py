"""Plain-torch core of ComfyUI-HyperDreamBooth (no ComfyUI imports here)."""

__version__ = "0.1.0"
