"""HDB_LoadHyperNet and HDB_PredictLiDBWeights: one face photo in, a predicted LiDB out.

HYPERNET values are ComfyUI ModelPatchers around an hdb_core HyperNetwork, so
ComfyUI's model management moves the network to the GPU when it is used and
offloads it when memory is needed, like any other model.
"""
from __future__ import annotations

import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io

from hdb_core.errors import HDBError
from hdb_core.hypernet.file import load_hypernet
from hdb_core.hypernet.image_encoder import EncoderSpec, check_images
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
        offload = mm.unet_offload_device()
        with torch.inference_mode(False):  # ordinary tensors, so a training node may use the network too
            net = load_hypernet(path, device=offload)
        net.requires_grad_(False)
        return io.NodeOutput(comfy.model_patcher.ModelPatcher(net, load_device=mm.get_torch_device(),
                                                              offload_device=offload))


def connected_encoder_spec(clip_vision) -> EncoderSpec:
    """What the connected CLIP_VISION feeds the hypernetwork (read from ComfyUI's ClipVisionModel)."""
    try:
        pos = clip_vision.model.vision_model.embeddings.position_embedding.weight
        size, mean, std = clip_vision.image_size, clip_vision.image_mean, clip_vision.image_std
    except AttributeError:
        raise HDBError("The connected clip_vision is not a CLIP vision model (ViT); load a CLIP vision model "
                       "such as CLIP-ViT-H-14 with Load CLIP Vision.") from None
    return EncoderSpec(hidden_size=pos.shape[1], num_tokens=pos.shape[0], image_size=int(size),
                       image_mean=tuple(mean), image_std=tuple(std), hidden_state="penultimate",
                       name="the connected CLIP vision model")


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
        bar = comfy.utils.ProgressBar(2)
        features = clip_vision.encode_image(image, crop=net.encoder.crop)["penultimate_hidden_states"]
        bar.update(1)
        mm.throw_exception_if_processing_interrupted()
        mm.load_models_gpu([hypernet], force_full_load=True)
        info = {"base_model": net.base_model}
        if net.info.get("trigger"):
            info["trigger"] = net.info["trigger"]
        # Outside inference mode, so the LiDB holds ordinary tensors that Fast Finetune can train from.
        with torch.inference_mode(False), torch.no_grad():
            lidb = net.predict_lidb(features.float().clone(),
                                    iterations if iterations > 0 else None, **info)
        bar.update(1)
        return io.NodeOutput(lidb)


NODES = [LoadHyperNet, PredictLiDBWeights]
