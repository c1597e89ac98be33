"""The hypernetwork beside ComfyUI's models: its memory management and the CLIP vision features.

ComfyUI internals this file relies on (check them on a ComfyUI upgrade):
* `comfy.model_patcher.ModelPatcher(module, load_device, offload_device)` around any nn.Module,
  so `comfy.model_management.load_models_gpu` moves it to the GPU and offloads it like a model;
* `comfy.model_management.get_torch_device()`, `unet_offload_device()`;
* CLIP_VISION values (`comfy.clip_vision.ClipVisionModel`): `.model.vision_model.embeddings.
  position_embedding.weight`, `.image_size`, `.image_mean`, `.image_std`, and
  `encode_image(image, crop=)["penultimate_hidden_states"]`.
"""
from __future__ import annotations

import torch

import comfy.model_management as mm
import comfy.model_patcher

from hdb_core.errors import HDBError
from hdb_core.hypernet.file import load_hypernet
from hdb_core.hypernet.image_encoder import EncoderSpec


def load_managed_hypernet(path: str):
    """The hypernetwork file as a ModelPatcher: on the offload device until a prediction needs it."""
    offload = mm.unet_offload_device()
    with torch.inference_mode(False):  # ordinary tensors, so a training node may use the network too
        net = load_hypernet(path, device=offload)
    net.requires_grad_(False)
    return comfy.model_patcher.ModelPatcher(net, load_device=mm.get_torch_device(), offload_device=offload)


def load_for_prediction(patcher) -> None:
    mm.load_models_gpu([patcher], force_full_load=True)


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


def image_features(clip_vision, image: torch.Tensor, crop: bool) -> torch.Tensor:
    """[B, tokens, hidden] penultimate hidden states of the photos, as the hypernetwork was trained on."""
    return clip_vision.encode_image(image, crop=crop)["penultimate_hidden_states"]
