"""Development-only nodes (tests, demo): tiny random-weight checkpoints. Never shipped to users' graphs."""
from __future__ import annotations

from comfy_api.latest import io

from . import tiny_dits, tiny_models


class TinyCheckpoint(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HDBDev_TinyCheckpoint",
            display_name="Tiny random SD1.5-architecture checkpoint (dev)",
            category="HyperDreamBooth/dev",
            inputs=[
                io.Combo.Input("scale", options=["tiny", "mid"], default="tiny",
                               tooltip="tiny: 32-channel UNet for tests; mid: 128-channel for benchmarks."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Seed of the random weights."),
                io.Boolean.Input("v_prediction", default=False, tooltip="Build a v-prediction model."),
            ],
            outputs=[io.Model.Output(), io.Clip.Output(), io.Vae.Output()],
        )

    @classmethod
    def execute(cls, scale="tiny", seed=0, v_prediction=False) -> io.NodeOutput:
        return io.NodeOutput(*tiny_models.comfy_checkpoint(scale, seed, v_prediction))


class TinyDiTCheckpoint(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HDBDev_TinyDiTCheckpoint",
            display_name="Tiny random DiT checkpoint of ComfyUI's real classes (dev)",
            category="HyperDreamBooth/dev",
            inputs=[
                io.Combo.Input("family", options=list(tiny_dits.FAMILIES), default="flux1",
                               tooltip="Which family's ComfyUI classes to build."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Seed of the random weights."),
                io.Combo.Input("weight_format", options=list(tiny_dits.WEIGHT_FORMATS), default="fp32",
                               optional=True, tooltip="How the transformer's weights are stored."),
            ],
            outputs=[io.Model.Output(), io.Clip.Output(), io.Vae.Output()],
        )

    @classmethod
    def execute(cls, family="flux1", seed=0, weight_format="fp32") -> io.NodeOutput:
        return io.NodeOutput(*tiny_dits.comfy_dit_checkpoint(family, "tiny", seed, weight_format=weight_format))


DEV_NODES = [TinyCheckpoint, TinyDiTCheckpoint]


def register(nodes_module) -> None:
    from . import dev_vision_nodes

    for cls in DEV_NODES + dev_vision_nodes.DEV_NODES:
        schema = cls.GET_SCHEMA()
        nodes_module.NODE_CLASS_MAPPINGS[schema.node_id] = cls
        nodes_module.NODE_DISPLAY_NAME_MAPPINGS[schema.node_id] = schema.display_name
