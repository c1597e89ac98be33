"""ComfyUI nodes: thin wrappers that translate ComfyUI types to hdb_core calls."""
from __future__ import annotations

from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from .folders import register_folders

register_folders()


def all_nodes() -> list[type[io.ComfyNode]]:
    from . import lidb_nodes

    nodes = list(lidb_nodes.NODES)
    from . import face_crop_node; nodes += face_crop_node.NODES  # noqa: E702
    from . import hypernet_nodes; nodes += hypernet_nodes.NODES  # noqa: E702
    from . import finetune_node; nodes += finetune_node.NODES  # noqa: E702
    return nodes


class HyperDreamBoothExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return all_nodes()


async def comfy_entrypoint() -> HyperDreamBoothExtension:
    register_folders()
    return HyperDreamBoothExtension()
