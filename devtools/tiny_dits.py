"""Diffusion-transformer checkpoints of ComfyUI's real classes, built from configs (random weights).

The DiT twin of tiny_models.py: (MODEL, CLIP, VAE) as a checkpoint loader would give them, for
the families HyperDreamBooth covers beyond the UNets. Scales:

  tiny  width-32 transformer with 2 blocks of each kind, tiny text encoders, a small VAE with the
        family's latent channels (tests; well under a second per forward)
  mid   a Flux-architecture transformer of tens of millions of parameters (bench)
  full  the real shapes (counting targets on the meta device; MODEL only)

Text encoders are ComfyUI's own classes: CLIP-L (+ CLIP-G) and T5 at width 32 for Flux.1 and
SD3.5; the LLM encoders of Flux.2 / Z-Image / Qwen-Image are not built here (tests give those
families an SD1 CLIP-L stand-in only where a prompt must be encoded; see `stand_in_clip`).
"""
from __future__ import annotations

import torch

from devtools.tiny_models import TINY_TEXT

FAMILIES = ("flux1", "sd35", "flux2", "zimage", "qwenimage")
TINY_T5 = dict(d_model=32, d_ff=64, d_kv=16, num_heads=2, num_layers=2, vocab_size=32128)

_CONFIGS = {
    "flux1": {
        "tiny": dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=32,
                     hidden_size=32, mlp_ratio=2.0, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[4, 6, 6],
                     theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True),
        "mid": dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=256, context_in_dim=256,
                    hidden_size=512, mlp_ratio=4.0, num_heads=8, depth=4, depth_single_blocks=8,
                    axes_dim=[16, 24, 24], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True),
        "full": dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
                     hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38,
                     axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True),
    },
}


@torch.no_grad()
def init_all(module: torch.nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Every parameter set deterministically (ComfyUI's layers leave them empty): norm weights and
    scales 1, biases 0, everything else small normal."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        norm = "norm" in type(m).__name__.lower()
        for name, p in m.named_parameters(recurse=False):
            if p.device.type == "meta":
                continue
            if norm and name in ("weight", "scale"):
                p.fill_(1.0)
            elif name == "bias" or norm:
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _model(family: str, scale: str, seed: int, device: str, dtype: torch.dtype):
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models

    if family == "flux1":
        config_class, base_class = comfy.supported_models.Flux, comfy.model_base.Flux
    else:
        raise ValueError(f"unknown family {family!r}")
    model_config = config_class(dict(_CONFIGS[family][scale]))
    model_config.set_inference_dtype(dtype, None)
    if device == "meta":
        with torch.device("meta"):
            base = base_class(model_config, device="meta")
    else:
        base = base_class(model_config, device=device)
        init_all(base.diffusion_model, seed)
    base.eval()
    return comfy.model_patcher.ModelPatcher(base, load_device=torch.device(device),
                                            offload_device=torch.device("cpu" if device == "meta" else device))


def _clip(family: str, seed: int):
    import comfy.sd
    import comfy.text_encoders.flux
    from comfy.supported_models_base import ClipTarget

    if family == "flux1":
        target = ClipTarget(comfy.text_encoders.flux.FluxTokenizer, comfy.text_encoders.flux.flux_clip())
        options = {"clip_l_model_config": dict(TINY_TEXT), "t5xxl_model_config": dict(TINY_T5)}
    else:
        raise ValueError(f"no tiny text encoder for {family!r}")
    clip = comfy.sd.CLIP(target=target, model_options={**options, "dtype": torch.float32})
    init_all(clip.cond_stage_model, seed + 1)
    return clip


def _vae(latent_channels: int, seed: int):
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    ddconfig = {'double_z': True, 'z_channels': latent_channels, 'resolution': 256, 'in_channels': 3, 'out_ch': 3,
                'ch': 32, 'ch_mult': [1, 1, 1, 1], 'num_res_blocks': 1, 'attn_resolutions': [], 'dropout': 0.0}
    ae = AutoencoderKL(ddconfig=ddconfig, embed_dim=latent_channels)
    init_all(ae, seed + 2, std=0.05)
    vae = comfy.sd.VAE(sd=ae.state_dict(), config={"params": {"ddconfig": ddconfig, "embed_dim": latent_channels}})
    vae.latent_channels = latent_channels
    return vae


def comfy_dit_checkpoint(family: str, scale: str = "tiny", seed: int = 0, device: str = "cpu",
                         dtype: torch.dtype = torch.float32):
    """(MODEL, CLIP, VAE) of a DiT family; on the meta device (full-size counting) only the MODEL (others None)."""
    model = _model(family, scale, seed, device, dtype)
    if device == "meta":
        return model, None, None
    channels = model.model.latent_format.latent_channels
    return model, _clip(family, seed), _vae(channels, seed)
