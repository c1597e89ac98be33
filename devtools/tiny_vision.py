"""Tiny CLIP vision encoders for tests: a ComfyUI CLIP_VISION and its transformers twin with the same weights.

ComfyUI's ClipVisionModel is built from a JSON config file (as CLIPVisionLoader
does for ViT-H/L/G), so the tiny config is written to a temp file. ComfyUI's
layers skip weight init, so weights are set by `tiny_models.init_weights` plus
the class embedding (a bare Parameter). The twin is a transformers
CLIPVisionModelWithProjection: ComfyUI's state-dict keys are transformers'
keys already, so the same tensors load into it unchanged.
"""
from __future__ import annotations

import json
import os
import tempfile

import torch

TINY = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=3, image_size=56,
            patch_size=14, projection_dim=16, hidden_act="gelu", num_channels=3, layer_norm_eps=1e-5,
            model_type="clip_vision_model")


def config(**overrides) -> dict:
    return {**TINY, **overrides}


def comfy_clip_vision(seed: int = 0, **overrides):
    """A ComfyUI CLIP_VISION (comfy.clip_vision.ClipVisionModel) with seeded random weights."""
    import comfy.clip_vision

    cfg = config(**overrides)
    fd, path = tempfile.mkstemp(prefix="tiny_clip_vision_", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(cfg, f)
    try:
        clip_vision = comfy.clip_vision.ClipVisionModel(path)
    finally:
        os.unlink(path)
    _init(clip_vision.model, seed)
    return clip_vision


@torch.no_grad()
def _init(model: torch.nn.Module, seed: int) -> None:
    from .tiny_models import init_weights

    init_weights(model, seed)
    emb = model.vision_model.embeddings
    g = torch.Generator().manual_seed(seed + 1000)
    emb.class_embedding.copy_(torch.randn(emb.class_embedding.shape, generator=g) * 0.02)
    # Non-trivial norms, so a wrong LayerNorm mapping would show up in the comparison.
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
            m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))


def transformers_twin(clip_vision, **overrides):
    """transformers CLIPVisionModelWithProjection with the ComfyUI model's config and exact weights (float32)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = config(**overrides)
    hf_cfg = CLIPVisionConfig(**{k: v for k, v in cfg.items() if k != "model_type"})
    model = CLIPVisionModelWithProjection(hf_cfg).eval()
    sd = {k: v.float() for k, v in clip_vision.model.state_dict().items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"key mismatch between ComfyUI and transformers CLIP vision: {missing} {unexpected}")
    return model
