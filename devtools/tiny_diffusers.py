"""A tiny Stable-Diffusion-architecture diffusers folder, built from configs with random weights.

No weights can be downloaded here, so the training pipeline is tested and
benchmarked on models of the SD1.x architecture shrunk to a few hundred
thousand parameters: UNet2DConditionModel (cross-attention at every level),
an 8x-downscaling AutoencoderKL, a 2-layer CLIPTextModel with the real SD1
tokenizer files (copied from ComfyUI), a DDPMScheduler with SD's betas, and a
small CLIP vision tower for the hypernetwork's image encoder.

    python -m devtools.tiny_diffusers OUT_DIR [--scale tiny|mid] [--seed 0]
"""
from __future__ import annotations

import argparse
import os
import shutil

import torch


SCALES = {
    # latent 8x8 for 64 px images; every UNet level has cross-attention. Same shapes as
    # devtools.tiny_models "tiny" (ComfyUI), so LiDBs trained here apply to that MODEL/CLIP.
    "tiny": dict(unet=dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                           attention_head_dim=2, norm_num_groups=32),
                 text=dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
                           projection_dim=32),
                 vae=dict(block_out_channels=(16, 16, 16, 16), norm_num_groups=8),
                 vision=None),   # devtools.tiny_vision's config: the twin of HDBDev_TinyClipVision
    # "tiny" with a VAE that ComfyUI's own VAE class can load (32 channels, 32 norm groups): the twin
    # of devtools.tiny_models.comfy_twin, for tests that run the same weights through both stacks.
    "twin": dict(unet=dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                           attention_head_dim=2, norm_num_groups=32),
                 text=dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
                           projection_dim=32),
                 vae=dict(block_out_channels=(32, 32, 32, 32), norm_num_groups=32),
                 vision=None),
    # for benchmarks: wider, three levels, 4-layer text encoder.
    "mid": dict(unet=dict(block_out_channels=(128, 256, 256), layers_per_block=1, cross_attention_dim=256,
                          attention_head_dim=4, norm_num_groups=32),
                text=dict(hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_hidden_layers=4,
                          projection_dim=256),
                vae=dict(block_out_channels=(32, 32, 32, 32), norm_num_groups=16),
                vision=dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_hidden_layers=2,
                            projection_dim=64, image_size=64, patch_size=16)),
}


def build(scale: str = "tiny", seed: int = 0):
    """(unet, vae, text_encoder, tokenizer, scheduler, image_encoder) with seeded random weights."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)

    s = SCALES[scale]
    levels = len(s["unet"]["block_out_channels"])
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4,
                                down_block_types=("CrossAttnDownBlock2D",) * levels,
                                up_block_types=("CrossAttnUpBlock2D",) * levels, **s["unet"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=64, **s["vae"])
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **s["text"]))
    if s["vision"] is None:
        from .tiny_vision import config as vision_config

        vision = {k: v for k, v in vision_config().items() if k != "model_type"}
    else:
        vision = s["vision"]
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**vision))
    from .comfy_runtime import comfy_path

    # The real SD1 tokenizer files that ComfyUI ships, from wherever ComfyUI is (COMFYUI_PATH or .comfyui/).
    tokenizer_dir = os.path.join(comfy_path(), "comfy", "sd1_tokenizer")
    tokenizer = CLIPTokenizer(os.path.join(tokenizer_dir, "vocab.json"), os.path.join(tokenizer_dir, "merges.txt"),
                              model_max_length=77)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", prediction_type="epsilon",
                              steps_offset=1, clip_sample=False)
    for m in (unet, vae, text_encoder, image_encoder):
        m.eval()
    return unet, vae, text_encoder, tokenizer, scheduler, image_encoder


def save(path: str, scale: str = "tiny", seed: int = 0, with_image_encoder: bool = True) -> str:
    """Write a diffusers StableDiffusionPipeline folder (plus image_encoder/) to `path`."""
    from diffusers import StableDiffusionPipeline

    unet, vae, text_encoder, tokenizer, scheduler, image_encoder = build(scale, seed)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    if with_image_encoder:
        image_encoder.save_pretrained(os.path.join(path, "image_encoder"), safe_serialization=True)
    return path


def copy_without(src: str, dst: str, *relative: str) -> str:
    """A copy of a diffusers folder with some files removed (to test error messages)."""
    shutil.copytree(src, dst)
    for rel in relative:
        p = os.path.join(dst, rel)
        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.exists(p):
            os.unlink(p)
    return dst


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--scale", choices=sorted(SCALES), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    save(args.out, args.scale, args.seed)
    print(args.out)


if __name__ == "__main__":
    main()
