"""Which layers a LiDB adapts, and what they are called.

Targets are found from a model's structure: every Linear that is an attention
q/k/v/out projection (diffusers/ComfyUI UNet names `to_q, to_k, to_v, to_out.0`,
CLIP names `q_proj, k_proj, v_proj, out_proj`). New architectures with the same
attention naming work without a table.

Canonical layer names are diffusers module paths with a component prefix:
`unet.` for the UNet, `te.` for the single text encoder of SD1.x/SD2.x, `te1.`
and `te2.` for SDXL's two. The kohya LoRA key of a layer derives from it (see
`kohya_name`), which is what ComfyUI, A1111/Forge and diffusers all read.

Diffusion transformers (SD3.5, Flux.1, Flux.2, Z-Image, Qwen-Image) are named by the
diffusers/PEFT LoRA key that ComfyUI's own LoRA table lists for the layer, e.g.
`transformer.transformer_blocks.0.attn.to_q` (a row slice of Flux's fused qkv) or
`diffusion_model.layers.0.attention.to_k` (Z-Image): the component is its first part
(`transformer` or `diffusion_model`), and the name is the layer's key in an exported
LoRA as it is (see `lora_key`). Which layers count is `is_dit_projection`.
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
TRANSFORMER = "transformer"          # a DiT named by diffusers keys (SD3.5, Flux.1/.2, Qwen-Image)
DIFFUSION_MODEL = "diffusion_model"  # a DiT whose diffusers LoRA keys carry this prefix (Z-Image/Lumina 2)
DIT_COMPONENTS = (TRANSFORMER, DIFFUSION_MODEL)
DIFFUSION_COMPONENTS = (UNET,) + DIT_COMPONENTS
COMPONENTS = (UNET, TE, TE1, TE2) + DIT_COMPONENTS
TEXT_ENCODERS = (TE, TE1, TE2)
# diffusers names of a DiT's attention projections: q, k, v and out of the image stream (to_*) and of
# the text stream of joint blocks (add_*_proj, to_add_out); `attention.` is Lumina 2 / Z-Image's spelling,
# `attn2.` SD3.5 Medium's second self-attention.
DIT_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
DIT_ATTENTION = ("attn", "attn2", "attention")

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


def is_dit_projection(path: str, all_paths: "set[str]") -> bool:
    """Whether the diffusers path `path` of a DiT (among all its diffusers paths) is an attention projection.

    q/k/v/out of an `attn`/`attention` module, and the `proj_out` of a parallel block (Flux's single
    blocks: attention output and MLP output share one output Linear, diffusers' `proj_out` beside `attn`).
    MLPs, modulation, norms and embedders are not.
    """
    parent, _, leaf = path.rpartition(".")
    for attn in DIT_ATTENTION:
        for proj in DIT_PROJECTIONS:
            if path.endswith(f".{attn}.{proj}") or path == f"{attn}.{proj}":
                return True
    if leaf == "proj_out" and parent:
        return f"{parent}.attn.to_q" in all_paths
    return False


def is_linear(m: torch.nn.Module) -> bool:
    """A torch Linear, or a Linear-like layer that is not one (ComfyUI's fp8 mixed-precision Linear holds a
    quantised 2-D weight and in/out_features but subclasses only torch.nn.Module)."""
    if isinstance(m, torch.nn.Linear):
        return True
    weight = getattr(m, "weight", None)
    return (isinstance(getattr(m, "in_features", None), int) and isinstance(getattr(m, "out_features", None), int)
            and isinstance(weight, torch.Tensor) and weight.dim() == 2)


def find_attention_projections(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(module path, Linear) for every attention projection inside `module`, in module order."""
    return [(path, m) for path, m in module.named_modules() if is_projection_path(path) and is_linear(m)]


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


def is_dit(layers: Sequence[LayerSpec]) -> bool:
    return any(s.component in DIT_COMPONENTS for s in layers)


# Text encoders in a diffusers-format LoRA (diffusers' SD3 and Flux pipelines, ComfyUI's table).
_PEFT_TEXT_ENCODERS = {TE: "text_encoder", TE1: "text_encoder", TE2: "text_encoder_2"}


def lora_key(canonical: str, dit: bool) -> str:
    """The layer's key in an exported LoRA: kohya for UNet LiDBs, diffusers/PEFT for DiT LiDBs.

    A DiT layer's canonical name already is its diffusers key; its text encoders (CLIP-L/G) use
    diffusers' `text_encoder.` / `text_encoder_2.` prefixes, as diffusers' SD3/Flux LoRAs do.
    """
    if not dit:
        return kohya_name(canonical)
    component, path = canonical.split(".", 1)
    if component in DIT_COMPONENTS:
        return canonical
    if component in _PEFT_TEXT_ENCODERS:
        return f"{_PEFT_TEXT_ENCODERS[component]}.{path}"
    raise ValueError(f"unknown component in layer name {canonical!r}")


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


def describe(layers: Sequence[LayerSpec], family: str | None = None) -> str:
    """Human description of an architecture from its target list (and family, if known), for error messages."""
    unet = [s for s in layers if s.component == UNET]
    dit = [s for s in layers if s.component in DIT_COMPONENTS]
    te_width = {s.component: s.in_features for s in layers if s.component in TEXT_ENCODERS}
    parts = []
    if dit:
        width = max(s.in_features for s in dit)
        parts.append(f"{'a' if not family or family[0] not in 'AEIOU' else 'an'} {family or 'diffusion'} "
                     f"transformer ({len(dit)} attention projections, width {width})")
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
            parts.append(f"{'CLIP-L/G' if dit else 'SDXL'} text encoders (widths {te_width[TE1]}/{te_width[TE2]})")
        else:
            w = next(iter(te_width.values()))
            fam = (f"CLIP-L (width {w})" if dit else
                   {768: "CLIP-L (SD1.x)", 1024: "OpenCLIP-H (SD2.x)"}.get(w, f"width {w}"))
            parts.append(f"a {fam} text encoder")
    return " and ".join(parts) if parts else "no attention layers"


def check_family(made_for: str | None, connected: str | None, what: str) -> None:
    """HDBError when something made for one model family meets another (both known)."""
    if made_for and connected and made_for != connected:
        raise HDBError(f"{what} was made for {made_for} but the connected model is {connected}; connect a "
                       f"{made_for} model, or use one made for {connected}.")


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
