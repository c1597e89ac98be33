"""Diffusion-transformer checkpoints of ComfyUI's real classes, built from configs (random weights).

The DiT twin of tiny_models.py: (MODEL, CLIP, VAE) as a checkpoint loader would give them, for
the families HyperDreamBooth covers beyond the UNets. Scales:

  tiny  width-32 transformer with 2 blocks of each kind, tiny text encoders, a small VAE with the
        family's latent channels (tests; well under a second per forward)
  mid   a Flux-architecture transformer of tens of millions of parameters (bench)
  full  the real shapes (counting targets on the meta device; MODEL only)

Text encoders are ComfyUI's own classes at width 32: CLIP-L + T5 for Flux.1, CLIP-L + CLIP-G for
SD3.5 (built without its optional T5, whose output must be 4096 wide to join theirs), Qwen3 for
Z-Image. Flux.2 and Qwen-Image get the same tiny Qwen3 encoder as a stand-in: ComfyUI 0.3.75
ships Flux.2's Mistral encoder (Klein's Qwen3 came later) and a Qwen2.5-VL for Qwen-Image, and
what matters to HyperDreamBooth is only that they are LLM encoders, never targets.
"""
from __future__ import annotations

import torch

from devtools.tiny_models import TINY_TEXT

FAMILIES = ("flux1", "sd35", "flux2", "zimage", "qwenimage")
TINY_T5 = dict(d_model=32, d_ff=64, d_kv=16, num_heads=2, num_layers=2, vocab_size=32128)
TINY_QWEN3 = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                  num_key_value_heads=1)
_SD3_TINY = dict(in_channels=16, out_channels=16, patch_size=2, depth=2, input_size=None, adm_in_channels=64,
                 context_embedder_config={"target": "torch.nn.Linear",
                                          "params": {"in_features": 4096, "out_features": 128}},
                 num_patches=256, pos_embed_max_size=16, pos_embed_scaling_factor=None, qk_norm="rms",
                 x_block_self_attn_layers=[0])

_CONFIGS = {
    "flux1": {
        "tiny": dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=32,
                     hidden_size=32, mlp_ratio=4.0, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[4, 6, 6],
                     theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True),
        "mid": dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=256, context_in_dim=256,
                    hidden_size=512, mlp_ratio=4.0, num_heads=8, depth=4, depth_single_blocks=8,
                    axes_dim=[16, 24, 24], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True),
        "full": dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
                     hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38,
                     axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True),
    },
    "sd35": {    # MMDiT: width = 64 x depth; SD3.5 Medium's extra self-attention (attn2) in block 0
        "tiny": _SD3_TINY,
        "full": dict(_SD3_TINY, depth=38, adm_in_channels=2048, num_patches=36864, pos_embed_max_size=192,
                     x_block_self_attn_layers=[],
                     context_embedder_config={"target": "torch.nn.Linear",
                                              "params": {"in_features": 4096, "out_features": 2432}}),
    },
    "flux2": {   # Klein 4B's shapes at full size (5 double, 20 single blocks, width 3072)
        "tiny": dict(image_model="flux2", in_channels=128, out_channels=128, vec_in_dim=None, context_in_dim=32,
                     hidden_size=32, mlp_ratio=3.0, num_heads=2, depth=2, depth_single_blocks=2,
                     axes_dim=[4, 4, 4, 4], theta=2000, patch_size=1, qkv_bias=False, guidance_embed=False,
                     global_modulation=True, mlp_silu_act=True, ops_bias=False, default_ref_method="index",
                     ref_index_scale=10.0),
        "full": dict(image_model="flux2", in_channels=128, out_channels=128, vec_in_dim=None, context_in_dim=7680,
                     hidden_size=3072, mlp_ratio=3.0, num_heads=24, depth=5, depth_single_blocks=20,
                     axes_dim=[32, 32, 32, 32], theta=2000, patch_size=1, qkv_bias=False, guidance_embed=False,
                     global_modulation=True, mlp_silu_act=True, ops_bias=False, default_ref_method="index",
                     ref_index_scale=10.0),
    },
    "zimage": {
        # width 256: Z-Image's modulation reads a 256-wide time embedding through a min(width, 256) input
        "tiny": dict(image_model="lumina2", patch_size=2, in_channels=16, dim=256, cap_feat_dim=32, n_layers=2,
                     n_refiner_layers=1, n_heads=4, n_kv_heads=4, multiple_of=16, ffn_dim_multiplier=8.0 / 3.0,
                     qk_norm=True, axes_dims=[16, 24, 24], axes_lens=[64, 32, 32], rope_theta=256.0,
                     z_image_modulation=True, time_scale=1000.0, pad_tokens_multiple=32),
        "full": dict(image_model="lumina2", patch_size=2, in_channels=16, dim=3840, cap_feat_dim=2560, n_layers=30,
                     n_refiner_layers=2, n_heads=30, n_kv_heads=30, multiple_of=256, ffn_dim_multiplier=8.0 / 3.0,
                     qk_norm=True, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512], rope_theta=256.0,
                     z_image_modulation=True, time_scale=1000.0, pad_tokens_multiple=32),
    },
    "qwenimage": {
        "tiny": dict(image_model="qwen_image", patch_size=2, in_channels=64, out_channels=16, num_layers=2,
                     attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=[4, 6, 6]),
        "full": dict(image_model="qwen_image", patch_size=2, in_channels=64, out_channels=16, num_layers=60,
                     attention_head_dim=128, num_attention_heads=24, joint_attention_dim=3584,
                     axes_dims_rope=[16, 56, 56]),
    },
}


@torch.no_grad()
def init_all(module: torch.nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Every parameter set deterministically (ComfyUI's layers leave them empty): norm weights, scales
    and gammas 1, biases 0, everything else small normal."""
    generators: dict = {}

    def normal(t: torch.Tensor) -> torch.Tensor:      # drawn where the weight lives (a 12B model on a GPU)
        g = generators.setdefault(t.device, torch.Generator(device=t.device).manual_seed(seed))
        return torch.randn(t.shape, generator=g, device=t.device, dtype=torch.float32) * std

    for m in module.modules():
        norm = "norm" in type(m).__name__.lower()
        for name, p in m.named_parameters(recurse=False):
            if p.device.type == "meta":
                continue
            if norm and name in ("weight", "scale", "gamma"):
                p.fill_(1.0)
            elif name == "bias" or norm:
                p.zero_()
            else:
                p.copy_(normal(p))
        for name, b in m.named_buffers(recurse=False):
            if name == "pos_embed" and b.device.type != "meta":    # SD3's fixed embedding, left empty by ComfyUI
                b.copy_(normal(b))


WEIGHT_FORMATS = ("fp32", "bf16", "fp16", "scaled_fp8", "fp8_mixed")


def _model(family: str, scale: str, seed: int, device: str, dtype: torch.dtype, weight_format: str = "fp32"):
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models

    sm, mb = comfy.supported_models, comfy.model_base
    classes = {"flux1": (sm.Flux, mb.Flux), "sd35": (sm.SD3, mb.SD3), "flux2": (sm.Flux2, mb.Flux2),
               "zimage": (sm.ZImage, mb.Lumina2), "qwenimage": (sm.QwenImage, mb.QwenImage)}
    if family not in classes:
        raise ValueError(f"unknown family {family!r}")
    config_class, base_class = classes[family]
    model_config = config_class(dict(_CONFIGS[family][scale]))
    model_config.set_inference_dtype(dtype, None)
    if device == "meta":
        with torch.device("meta"):
            base = base_class(model_config, device="meta")
    else:
        base = base_class(model_config, device=device)
        init_all(base.diffusion_model, seed)
        if weight_format != "fp32":
            base = stored_as(base, config_class(dict(_CONFIGS[family][scale])), base_class, weight_format, device)
    base.eval()
    return comfy.model_patcher.ModelPatcher(base, load_device=torch.device(device),
                                            offload_device=torch.device("cpu" if device == "meta" else device))


def stored_as(base, model_config, base_class, weight_format: str, device: str):
    """The same weights as a checkpoint in `weight_format` gives them, through ComfyUI's own operations:
    bf16/fp16 (manual cast to fp32), ComfyUI's scaled fp8 (`scaled_fp8` marker, `scale_weight` per Linear)
    or the fp8 mixed-precision format (`_quantization_metadata`: every Linear a QuantizedTensor with a
    `weight_scale`; its Linear is not a torch.nn.Linear). Loaded with BaseModel.load_model_weights as
    the checkpoint loaders do after detecting the format (tiny configs cannot be detected from weights)."""
    sd = base.diffusion_model.state_dict()
    linears = [path for path, m in base.diffusion_model.named_modules() if isinstance(m, torch.nn.Linear)]
    fp8 = torch.float8_e4m3fn
    if weight_format in ("bf16", "fp16"):
        stored = torch.bfloat16 if weight_format == "bf16" else torch.float16
        sd = {k: v.to(stored) if v.is_floating_point() else v for k, v in sd.items()}
        model_config.set_inference_dtype(stored, torch.float32)
    elif weight_format == "scaled_fp8":
        model_config.scaled_fp8 = fp8
        for path in linears:
            sd[f"{path}.weight"] = sd[f"{path}.weight"].to(fp8)
            sd[f"{path}.scale_weight"] = torch.tensor(1.0)
        model_config.set_inference_dtype(fp8, torch.float32)
    elif weight_format == "fp8_mixed":
        model_config.layer_quant_config = {path: {"format": "float8_e4m3fn"} for path in linears}
        for path in linears:
            sd[f"{path}.weight"] = sd[f"{path}.weight"].to(fp8)
            sd[f"{path}.weight_scale"] = torch.tensor(1.0)
        model_config.set_inference_dtype(fp8, torch.float32)
    else:
        raise ValueError(f"unknown weight format {weight_format!r}")
    stored_base = base_class(model_config, device=device)
    stored_base.load_model_weights({f"diffusion_model.{k}": v for k, v in sd.items()}, "diffusion_model.")
    return stored_base


def _text_width(hidden: int, base: dict) -> dict:
    return dict(base, hidden_size=hidden, intermediate_size=2 * hidden, **(
        {"projection_dim": hidden} if "projection_dim" in base else {}))


def _clip(family: str, seed: int, cfg: dict):
    """2-layer text encoders of the family's classes whose output widths fit the transformer `cfg`
    (CLIP-L's pooled vector, T5's / the LLM's tokens): tiny for tiny models, wide for full ones."""
    import comfy.sd
    import comfy.text_encoders.flux
    import comfy.text_encoders.sd3_clip
    import comfy.text_encoders.z_image
    from comfy.supported_models_base import ClipTarget

    if family == "flux1":
        target = ClipTarget(comfy.text_encoders.flux.FluxTokenizer, comfy.text_encoders.flux.flux_clip())
        t5_width = cfg["context_in_dim"]
        options = {"clip_l_model_config": _text_width(cfg["vec_in_dim"], TINY_TEXT),
                   "t5xxl_model_config": dict(TINY_T5, d_model=t5_width, d_ff=2 * t5_width)}
    elif family == "sd35":
        target = ClipTarget(comfy.text_encoders.sd3_clip.SD3Tokenizer,
                            comfy.text_encoders.sd3_clip.sd3_clip(clip_l=True, clip_g=True, t5=False))
        full = cfg["adm_in_channels"] == 2048          # pooled = CLIP-L 768 + CLIP-G 1280
        options = {"clip_l_model_config": _text_width(768 if full else 32, TINY_TEXT),
                   "clip_g_model_config": _text_width(1280 if full else 32, TINY_TEXT)}
    elif family in ("zimage", "flux2", "qwenimage"):
        target = ClipTarget(comfy.text_encoders.z_image.ZImageTokenizer, comfy.text_encoders.z_image.te())
        width = cfg.get("cap_feat_dim") or cfg.get("context_in_dim") or cfg.get("joint_attention_dim")
        options = {"qwen3_4b_model_config": _text_width(width, TINY_QWEN3)}
    else:
        raise ValueError(f"no tiny text encoder for {family!r}")
    clip = comfy.sd.CLIP(target=target, model_options={**options, "dtype": torch.float32})
    init_all(clip.cond_stage_model, seed + 1)
    return clip


def _vae(latent_channels: int, seed: int, downscale: int = 8):
    """A small KL autoencoder with the family's latent channels and downscale (Flux.2: 128 channels at 1/16)."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    levels = {8: 4, 16: 5}[downscale]
    ddconfig = {'double_z': True, 'z_channels': latent_channels, 'resolution': 256, 'in_channels': 3, 'out_ch': 3,
                'ch': 32, 'ch_mult': [1] * levels, 'num_res_blocks': 1, 'attn_resolutions': [], 'dropout': 0.0}
    ae = AutoencoderKL(ddconfig=ddconfig, embed_dim=latent_channels)
    init_all(ae, seed + 2, std=0.05)
    vae = comfy.sd.VAE(sd=ae.state_dict(), config={"params": {"ddconfig": ddconfig, "embed_dim": latent_channels}})
    vae.latent_channels = latent_channels
    vae.downscale_ratio = vae.upscale_ratio = downscale
    return vae


def _wan_vae(seed: int):
    """Qwen-Image's VAE kind: a (narrow) Wan 2.1 VAE, 16 channels, video-shaped latents [B, 16, 1, h, w]."""
    import comfy.sd
    from comfy.ldm.wan.vae import WanVAE

    ae = WanVAE(dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                temperal_downsample=[False, True, True])
    init_all(ae, seed + 2, std=0.05)
    return comfy.sd.VAE(sd=ae.state_dict())


def comfy_dit_checkpoint(family: str, scale: str = "tiny", seed: int = 0, device: str = "cpu",
                         dtype: torch.dtype = torch.float32, weight_format: str = "fp32"):
    """(MODEL, CLIP, VAE) of a DiT family; on the meta device (full-size counting) only the MODEL (others None).

    `weight_format` stores the transformer's weights as a checkpoint of that kind would (see `stored_as`)."""
    model = _model(family, scale, seed, device, dtype, weight_format)
    if device == "meta":
        return model, None, None
    channels = model.model.latent_format.latent_channels
    vae = _wan_vae(seed) if family == "qwenimage" else _vae(channels, seed, 16 if family == "flux2" else 8)
    return model, _clip(family, seed, _CONFIGS[family][scale]), vae
