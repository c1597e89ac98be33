"""HDB_LoadHyperNet and HDB_PredictLiDBWeights: one face photo in, a predicted LiDB out.

HYPERNET values are ComfyUI ModelPatchers around an hdb_core HyperNetwork, so
ComfyUI's model management moves the network to the GPU when it is used and
offloads it when memory is needed, like any other model.
"""
from __future__ import annotations

import folder_paths
import torch
from comfy_api.latest import io

from hdb_core.hypernet.image_encoder import check_images
from .comfy_runtime import check_interrupt, progress_bar
from .comfy_vision import connected_encoder_spec, image_features, load_for_prediction, load_managed_hypernet
from .folders import HYPERNET_FOLDER, resolve_model_file
from .types import CATEGORY, HYPERNET, LIDB


class LoadHyperNet(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HDB_LoadHyperNet",
            display_name="Load HyperNetwork (HyperDreamBooth)",
            category=CATEGORY,
            description="Load a HyperDreamBooth hypernetwork, which predicts an identity (LiDB) from a face photo.",
            inputs=[
                io.Combo.Input("hypernet_name", options=folder_paths.get_filename_list(HYPERNET_FOLDER),
                               tooltip="A hypernetwork .safetensors file from models/hyperdreambooth "
                                       "(folders from extra_model_paths.yaml are listed too)."),
            ],
            outputs=[HYPERNET.Output(display_name="HYPERNET")],
        )

    @classmethod
    def execute(cls, hypernet_name) -> io.NodeOutput:
        path = resolve_model_file(HYPERNET_FOLDER, hypernet_name, "hypernetwork")
        return io.NodeOutput(load_managed_hypernet(path))


class PredictLiDBWeights(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HDB_PredictLiDBWeights",
            display_name="Predict LiDB Weights (HyperDreamBooth)",
            category=CATEGORY,
            description="Predict an identity (LiDB) from one or several photos of one face in a single pass; "
                        "use it directly with Apply LiDB or as Fast Finetune's init_lidb.",
            inputs=[
                HYPERNET.Input("hypernet", tooltip="The hypernetwork from Load HyperNetwork."),
                io.ClipVision.Input("clip_vision", tooltip="The CLIP vision encoder the hypernetwork was trained "
                                                           "with (usually CLIP-ViT-H-14 from models/clip_vision)."),
                io.Image.Input("image", tooltip="One photo of the face, or a batch of photos of the same person "
                                                "(all are looked at together). A cropped, centred face works best."),
                io.Int.Input("iterations", default=0, min=0, max=64,
                             tooltip="Refinement passes of the hypernetwork; 0 uses the number stored in the file "
                                     "(what it was trained with). More passes refine the prediction further."),
            ],
            outputs=[LIDB.Output(display_name="LIDB")],
        )

    @classmethod
    def execute(cls, hypernet, clip_vision, image, iterations=0) -> io.NodeOutput:
        net = hypernet.model
        check_images(image)
        spec = connected_encoder_spec(clip_vision)
        net.encoder.check(spec)
        progress = progress_bar()
        features = image_features(clip_vision, image, net.encoder.crop)
        progress(1, 2)
        check_interrupt()
        load_for_prediction(hypernet)
        info = {"base_model": net.base_model}
        for key in ("trigger", "family"):   # family: a DiT hypernetwork's LiDB is refused on other families
            if net.info.get(key):
                info[key] = net.info[key]
        # Outside inference mode, so the LiDB holds ordinary tensors that Fast Finetune can train from.
        with torch.inference_mode(False), torch.no_grad():
            lidb = net.predict_lidb(features.float().clone(),
                                    iterations if iterations > 0 else None, **info)
        progress(2, 2)
        return io.NodeOutput(lidb)


NODES = [LoadHyperNet, PredictLiDBWeights]
