"""Which layers a LiDB adapts, and what they are called.

Targets are found from a model's structure: every nn.Linear that is an attention
q/k/v/out projection (diffusers/ComfyUI UNet names `to_q, to_k, to_v, to_out.0`,
CLIP names `q_proj, k_proj, v_proj, out_proj`). New architectures with the same
attention naming work without a table.

Canonical layer names are diffusers module paths with a component prefix:
`unet.` for the UNet, `te.` for the single text encoder of SD1.x/SD2.x, `te1.`
and `te2.` for SDXL's two. The kohya LoRA key of a layer derives from it (see
`kohya_name`), which is what ComfyUI, A1111/Forge and diffusers all read.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

PROJECTION_SUFFIXES = ("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj")
COMPONENTS = ("unet", "te", "te1", "te2")


@dataclass(frozen=True)
class LayerSpec:
    """A target layer: canonical name and the Linear's shape (W is [out, in])."""

    name: str
    in_features: int
    out_features: int

    @property
    def component(self) -> str:
        return self.name.split(".", 1)[0]


def is_projection_path(path: str) -> bool:
    return any(path == s or path.endswith("." + s) for s in PROJECTION_SUFFIXES)


def find_attention_projections(module: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """(module path, Linear) for every attention projection inside `module`, in module order."""
    return [(path, m) for path, m in module.named_modules()
            if isinstance(m, torch.nn.Linear) and is_projection_path(path)]


def specs_from_module(module: torch.nn.Module, prefix: str) -> list[LayerSpec]:
    """Targets of a diffusers UNet (prefix 'unet') or a transformers CLIPTextModel ('te', 'te1', 'te2')."""
    if prefix not in COMPONENTS:
        raise ValueError(f"unknown component prefix {prefix!r}")
    return [LayerSpec(f"{prefix}.{path}", lin.in_features, lin.out_features)
            for path, lin in find_attention_projections(module)]


def kohya_name(canonical: str) -> str:
    """'unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q' -> 'lora_unet_down_blocks_0_..._to_q'."""
    component, path = canonical.split(".", 1)
    if component not in COMPONENTS:
        raise ValueError(f"unknown component in layer name {canonical!r}")
    return f"lora_{component}_{path.replace('.', '_')}"


def diffusers_lora_name(canonical: str) -> str:
    """PEFT/diffusers module path: 'unet.x' stays, 'te.x' -> 'text_encoder.x', 'te2.x' -> 'text_encoder_2.x'."""
    component, path = canonical.split(".", 1)
    return {"unet": "unet", "te": "text_encoder", "te1": "text_encoder", "te2": "text_encoder_2"}[component] + "." + path


def describe(layers: list[LayerSpec] | tuple[LayerSpec, ...]) -> str:
    """Human description of an architecture from its target list, for error messages."""
    unet = [l for l in layers if l.component == "unet"]
    te_width = {l.component: l.in_features for l in layers if l.component != "unet"}
    parts = []
    if unet:
        ctx = sorted({l.in_features for l in unet if l.name.endswith("attn2.to_k")})
        family = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}.get(ctx[0]) if len(ctx) == 1 else None
        size = f"{len(unet)} attention projections"
        parts.append(f"an {family} UNet ({size})" if family == "SDXL" else
                     f"a {family} UNet ({size})" if family else
                     f"a custom UNet ({size}, cross-attention width {'/'.join(map(str, ctx)) or 'none'})")
    if te_width:
        if set(te_width) == {"te1", "te2"}:
            parts.append(f"SDXL text encoders (widths {te_width['te1']}/{te_width['te2']})")
        else:
            w = next(iter(te_width.values()))
            fam = {768: "CLIP-L (SD1.x)", 1024: "OpenCLIP-H (SD2.x)"}.get(w, f"width {w}")
            parts.append(f"a {fam} text encoder")
    return " and ".join(parts) if parts else "no attention layers"
