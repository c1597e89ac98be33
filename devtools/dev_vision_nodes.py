"""Development-only node: a tiny random CLIP vision encoder (stands in for CLIPVisionLoader in test graphs)."""
from __future__ import annotations

from comfy_api.latest import io

from . import tiny_vision


class TinyClipVision(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HDBDev_TinyClipVision",
            display_name="Tiny random CLIP vision encoder (dev)",
            category="HyperDreamBooth/dev",
            inputs=[io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Seed of the random weights.")],
            outputs=[io.ClipVision.Output()],
        )

    @classmethod
    def execute(cls, seed=0) -> io.NodeOutput:
        return io.NodeOutput(tiny_vision.comfy_clip_vision(seed))


DEV_NODES = [TinyClipVision]  # registered with the other dev nodes by dev_nodes.register

