"""Stable-Diffusion-architecture models built from configs, for tests, benches and the demo.

No weights can be downloaded here, so models are built with random weights.
ComfyUI's layers skip initialisation (torch.empty), so everything is
initialised by module type with a seeded generator: norms to 1/0, linear and
conv weights small normal. Sizes:

  tiny  32-channel, 2-level UNet, 2-layer width-32 CLIP  (tests; ~1.6M UNet params)
  mid   128-channel, 3-level UNet, 4-layer width-256 CLIP (benchmarks)
  full  the real SD1.5 shapes (counting targets on the meta device)
"""
from __future__ import annotations

import torch

UNET_BASE = {'use_checkpoint': False, 'image_size': 32, 'out_channels': 4, 'use_spatial_transformer': True,
             'legacy': False, 'adm_in_channels': None, 'in_channels': 4, 'use_linear_in_transformer': False,
             'use_temporal_attention': False, 'use_temporal_resblock': False}

SCALES = {
    "tiny": dict(unet=dict(model_channels=32, num_res_blocks=[1, 1], channel_mult=[1, 2], transformer_depth=[1, 1],
                           transformer_depth_middle=1, transformer_depth_output=[1, 1, 1, 1], context_dim=32,
                           num_heads=2),
                 clip=dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
                           projection_dim=32)),
    "mid": dict(unet=dict(model_channels=128, num_res_blocks=[1, 1, 1], channel_mult=[1, 2, 2],
                          transformer_depth=[1, 1, 1], transformer_depth_middle=1,
                          transformer_depth_output=[1, 1, 1, 1, 1, 1], context_dim=256, num_heads=4),
                clip=dict(hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_hidden_layers=4,
                          projection_dim=256)),
    "full": dict(unet=dict(model_channels=320, num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4],
                           transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
                           transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], context_dim=768,
                           num_heads=8),
                 clip=dict()),
}


@torch.no_grad()
def init_weights(module: torch.nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Deterministic init by module type (ComfyUI's ops leave weights uninitialised)."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm)):
            if m.weight is not None:
                m.weight.fill_(1.0)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv1d, torch.nn.Embedding)):
            w = m.weight
            if w.device.type != "meta":
                w.copy_(torch.randn(w.shape, generator=g) * std)
            b = getattr(m, "bias", None)
            if b is not None and b.device.type != "meta":
                b.zero_()
    for _name, p in module.named_parameters(recurse=True):
        if p.device.type != "meta" and not torch.isfinite(p).all():
            p.zero_()


def comfy_unet_config(scale: str = "tiny") -> dict:
    return {**UNET_BASE, **SCALES[scale]["unet"]}


def comfy_model(scale: str = "tiny", seed: int = 0, v_prediction: bool = False, device: str = "cpu"):
    """A ComfyUI MODEL (ModelPatcher over an SD1.5-architecture BaseModel)."""
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models

    cfg = comfy_unet_config(scale)
    model_config = comfy.supported_models.SD15(cfg)
    model_config.unet_config["num_heads"] = cfg["num_heads"]
    model_config.unet_config["num_head_channels"] = -1
    model_type = comfy.model_base.ModelType.V_PREDICTION if v_prediction else comfy.model_base.ModelType.EPS
    if device == "meta":
        with torch.device("meta"):
            base = comfy.model_base.BaseModel(model_config, model_type=model_type, device="meta")
    else:
        base = comfy.model_base.BaseModel(model_config, model_type=model_type, device=device)
        init_weights(base.diffusion_model, seed)
    base.eval()
    return comfy.model_patcher.ModelPatcher(base, load_device=torch.device(device), offload_device=torch.device(device))


def comfy_clip(scale: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ComfyUI CLIP: the real SD1 tokenizer with a (small) CLIP-L-architecture text model."""
    import comfy.sd
    import comfy.sd1_clip
    from comfy.supported_models_base import ClipTarget

    overrides = SCALES[scale]["clip"]
    options = {"clip_l_model_config": dict(overrides)} if overrides else {}
    options["dtype"] = dtype  # ComfyUI would pick fp16 on some devices; tests want exact fp32
    clip = comfy.sd.CLIP(target=ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel),
                         model_options=options)
    init_weights(clip.cond_stage_model, seed + 1)
    return clip


TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=3,
                 projection_dim=32)


def comfy_clip_of(family: str, seed: int = 0):
    """A tiny ComfyUI CLIP of another family's real classes: 'sd2' (OpenCLIP-H, penultimate layer)
    or 'sdxl' (CLIP-L + OpenCLIP-bigG), 3 layers each so the penultimate rule shows."""
    import comfy.sd
    import comfy.sdxl_clip
    from comfy.supported_models_base import ClipTarget
    from comfy.text_encoders import sd2_clip

    if family == "sd2":
        target = ClipTarget(sd2_clip.SD2Tokenizer, sd2_clip.SD2ClipModel)
        options = {"clip_h_model_config": dict(TINY_TEXT)}
    elif family == "sdxl":
        target = ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
        options = {"clip_l_model_config": dict(TINY_TEXT), "clip_g_model_config": dict(TINY_TEXT)}
    else:
        raise ValueError(f"unknown family {family!r}")
    clip = comfy.sd.CLIP(target=target, model_options={**options, "dtype": torch.float32})
    init_weights(clip.cond_stage_model, seed + 1)
    return clip


def comfy_vae(seed: int = 0):
    """A small KL autoencoder with SD's 8x downscale and 4 latent channels."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    ddconfig = {'double_z': True, 'z_channels': 4, 'resolution': 256, 'in_channels': 3, 'out_ch': 3, 'ch': 32,
                'ch_mult': [1, 1, 1, 1], 'num_res_blocks': 1, 'attn_resolutions': [], 'dropout': 0.0}
    config = {"params": {"ddconfig": ddconfig, "embed_dim": 4}}
    ae = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    init_weights(ae, seed + 2, std=0.05)
    return comfy.sd.VAE(sd=ae.state_dict(), config=config)


def comfy_checkpoint(scale: str = "tiny", seed: int = 0, v_prediction: bool = False):
    return comfy_model(scale, seed, v_prediction), comfy_clip(scale, seed), comfy_vae(seed)


def comfy_twin(unet, vae, text_encoder, v_prediction: bool = False):
    """ComfyUI (MODEL, CLIP, VAE) holding the weights of diffusers/transformers models of the "twin" scale.

    The UNet's keys go through ComfyUI's own diffusers->LDM table, the text encoder's match
    ComfyUI's CLIP-L layout as they are, and the VAE's are converted by ComfyUI's VAE class,
    so both stacks compute the same functions (tests compare them to float tolerance).
    """
    import comfy.sd
    import comfy.utils

    model = comfy_model("tiny", v_prediction=v_prediction)
    to_ldm = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    sd = unet.state_dict()
    missing, unexpected = model.model.diffusion_model.load_state_dict({to_ldm[k]: v for k, v in sd.items()},
                                                                     strict=False)
    if unexpected or [k for k in missing if "label_emb" not in k]:
        raise RuntimeError(f"UNet twin mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    clip = comfy_clip("tiny")
    missing, unexpected = clip.cond_stage_model.clip_l.transformer.load_state_dict(text_encoder.state_dict(),
                                                                                    strict=False)
    if unexpected or [k for k in missing if k not in ("text_projection.weight", "text_model.embeddings.position_ids")]:
        raise RuntimeError(f"CLIP twin mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    ddconfig = {'double_z': True, 'z_channels': 4, 'resolution': 256, 'in_channels': 3, 'out_ch': 3, 'ch': 32,
                'ch_mult': [1, 1, 1, 1], 'num_res_blocks': 1, 'attn_resolutions': [], 'dropout': 0.0}
    comfy_vae_ = comfy.sd.VAE(sd=dict(vae.state_dict()), config={"params": {"ddconfig": ddconfig, "embed_dim": 4}})
    return model, clip, comfy_vae_


SDXL_UNET = {**UNET_BASE, "num_classes": "sequential", "use_linear_in_transformer": True}
SDXL_SCALES = {
    "tiny": dict(model_channels=32, num_res_blocks=[1, 1], channel_mult=[1, 2], transformer_depth=[1, 1],
                 transformer_depth_middle=1, transformer_depth_output=[1, 1, 1, 1], context_dim=64,
                 adm_in_channels=TINY_TEXT["projection_dim"] + 6 * 256),
    "full": dict(model_channels=320, num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4],
                 transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_middle=10,
                 transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], context_dim=2048, num_head_channels=64,
                 adm_in_channels=2816),
}
FULL_VAE = {'double_z': True, 'z_channels': 4, 'resolution': 256, 'in_channels': 3, 'out_ch': 3, 'ch': 128,
            'ch_mult': [1, 2, 4, 4], 'num_res_blocks': 2, 'attn_resolutions': [], 'dropout': 0.0}


def comfy_checkpoint_of(family: str, scale: str, seed: int = 0, device: str = "cpu",
                        dtype: torch.dtype = torch.float32):
    """(MODEL, CLIP, VAE) of 'sd15' or 'sdxl' at scale 'tiny' or 'full' (real shapes, random weights),
    the UNet stored in `dtype` on `device`, as a checkpoint loader would give them."""
    import comfy.model_base
    import comfy.model_patcher
    import comfy.sd
    import comfy.sdxl_clip
    import comfy.supported_models
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.supported_models_base import ClipTarget

    if family == "sd15":
        cfg = comfy_unet_config(scale)
        model_config = comfy.supported_models.SD15(cfg)
        model_config.unet_config.update(num_heads=cfg["num_heads"], num_head_channels=-1)
        base_class = comfy.model_base.BaseModel
        clip = comfy_clip(scale if scale == "tiny" else "full", seed)
    elif family == "sdxl":
        model_config = comfy.supported_models.SDXL({**SDXL_UNET, **SDXL_SCALES[scale]})
        if scale == "tiny":   # SDXL's config fixes 64-channel heads, wider than the tiny UNet's blocks
            model_config.unet_config.update(num_heads=2, num_head_channels=-1)
        base_class = comfy.model_base.SDXL
        if scale == "tiny":
            clip = comfy_clip_of("sdxl", seed)
        else:
            clip = comfy.sd.CLIP(target=ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel),
                                 model_options={"dtype": torch.float32})
            init_weights(clip.cond_stage_model, seed + 1)
    else:
        raise ValueError(f"unknown family {family!r}")
    model_config.set_inference_dtype(dtype, None)
    base = base_class(model_config, model_type=comfy.model_base.ModelType.EPS, device=device)
    init_weights(base.diffusion_model, seed)
    base.eval()
    model = comfy.model_patcher.ModelPatcher(base, load_device=torch.device(device),
                                             offload_device=torch.device("cpu"))
    if scale == "tiny":
        vae = comfy_vae(seed)
    else:
        ae = AutoencoderKL(ddconfig=FULL_VAE, embed_dim=4)
        init_weights(ae, seed + 2, std=0.02)
        vae = comfy.sd.VAE(sd=ae.state_dict(), config={"params": {"ddconfig": FULL_VAE, "embed_dim": 4}})
    return model, clip, vae
