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
from typing import Mapping, Sequence

import torch

from hdb_core.errors import HDBError

PROJECTION_SUFFIXES = ("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj")

# Component prefixes of canonical layer names.
UNET = "unet"
TE = "te"          # the single text encoder of SD1.x/SD2.x
TE1 = "te1"        # SDXL's CLIP-L
TE2 = "te2"        # SDXL's OpenCLIP-bigG
COMPONENTS = (UNET, TE, TE1, TE2)
TEXT_ENCODERS = (TE, TE1, TE2)

# Cross-attention width of a UNet -> its family (kohya's ss_base_model_version beside it).
FAMILIES = {768: ("SD1.x", "sd_v1"), 1024: ("SD2.x", "sd_v2"), 2048: ("SDXL", "sdxl_base_v1-0")}


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


def discover(modules: Mapping[str, torch.nn.Module]) -> dict[str, tuple[LayerSpec, torch.nn.Linear]]:
    """Canonical name -> (spec, Linear) for {component: module}, e.g. {'unet': unet, 'te': text_encoder}."""
    out = {}
    for component, module in modules.items():
        if component not in COMPONENTS:
            raise ValueError(f"unknown component prefix {component!r}")
        for path, lin in find_attention_projections(module):
            name = f"{component}.{path}"
            out[name] = (LayerSpec(name, lin.in_features, lin.out_features), lin)
    return out


def specs_from_module(module: torch.nn.Module, component: str) -> list[LayerSpec]:
    """Targets of a diffusers UNet (component 'unet') or a transformers CLIPTextModel ('te', 'te1', 'te2')."""
    return [spec for spec, _ in discover({component: module}).values()]


def kohya_name(canonical: str) -> str:
    """'unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q' -> 'lora_unet_down_blocks_0_..._to_q'."""
    component, path = canonical.split(".", 1)
    if component not in COMPONENTS:
        raise ValueError(f"unknown component in layer name {canonical!r}")
    return f"lora_{component}_{path.replace('.', '_')}"


def unet_family(layers: Sequence[LayerSpec]) -> tuple[str, str] | None:
    """(family, kohya ss_base_model_version) of the UNet in `layers`, from its cross-attention width."""
    ctx = {s.in_features for s in layers if s.component == UNET and s.name.endswith("attn2.to_k")}
    return FAMILIES.get(next(iter(ctx))) if len(ctx) == 1 else None


def describe(layers: Sequence[LayerSpec]) -> str:
    """Human description of an architecture from its target list, for error messages."""
    unet = [s for s in layers if s.component == UNET]
    te_width = {s.component: s.in_features for s in layers if s.component in TEXT_ENCODERS}
    parts = []
    if unet:
        family = unet_family(unet)
        size = f"{len(unet)} attention projections"
        if family:
            parts.append(f"{'an' if family[0] == 'SDXL' else 'a'} {family[0]} UNet ({size})")
        else:
            ctx = sorted({s.in_features for s in unet if s.name.endswith("attn2.to_k")})
            parts.append(f"a custom UNet ({size}, cross-attention width {'/'.join(map(str, ctx)) or 'none'})")
    if te_width:
        if set(te_width) == {TE1, TE2}:
            parts.append(f"SDXL text encoders (widths {te_width[TE1]}/{te_width[TE2]})")
        else:
            w = next(iter(te_width.values()))
            fam = {768: "CLIP-L (SD1.x)", 1024: "OpenCLIP-H (SD2.x)"}.get(w, f"width {w}")
            parts.append(f"a {fam} text encoder")
    return " and ".join(parts) if parts else "no attention layers"


def check_layers_match(wanted: Sequence[LayerSpec], available: Sequence[LayerSpec], what: str) -> None:
    """HDBError unless every wanted layer exists in the model with the same shape."""
    have = {s.name: s for s in available}
    missing = [s for s in wanted if s.name not in have]
    wrong = [s for s in wanted if s.name in have and have[s.name] != s]
    if missing or wrong:
        first = (missing or wrong)[0]
        why = "has no layer" if missing else "has a different shape for layer"
        raise HDBError(f"{what} was made for {describe(wanted)} but the base model is {describe(available)} "
                       f"(the model {why} {first.name}); use the base model it was trained on.")
