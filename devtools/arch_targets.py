"""Full-size target lists (SD1.5, SDXL) built on the meta device: real shapes, no memory, no weights.

diffusers' UNet2DConditionModel with the published configs and transformers'
CLIPTextModel with the CLIP-L / OpenCLIP-bigG shapes, read through
hdb_core.lidb.targets.specs_from_module exactly as real models would be.
"""
from __future__ import annotations

import torch

from hdb_core.lidb.targets import LayerSpec, specs_from_module

CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              projection_dim=768)
CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                 projection_dim=1280, hidden_act="gelu")


def _text(prefix: str, cfg: dict) -> list[LayerSpec]:
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        return specs_from_module(CLIPTextModel(CLIPTextConfig(**cfg)), prefix)


def sd15_unet():
    """The SD1.5 UNet (diffusers) on the meta device."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)


def sdxl_unet():
    """The SDXL base UNet (diffusers) on the meta device."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(
            sample_size=128, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816, layers_per_block=2)


def sd15_targets() -> list[LayerSpec]:
    """176 layers: 128 UNet attention projections + 48 CLIP-L self-attention projections."""
    return specs_from_module(sd15_unet(), "unet") + _text("te", CLIP_L)


def sdxl_targets() -> list[LayerSpec]:
    """UNet (560 projections) + CLIP-L (te1, 48) + OpenCLIP-bigG (te2, 128)."""
    return specs_from_module(sdxl_unet(), "unet") + _text("te1", CLIP_L) + _text("te2", CLIP_BIGG)
