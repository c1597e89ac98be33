"""Map a loaded ComfyUI MODEL / CLIP to canonical LiDB layer names, modules and weight patches.

Canonical names are diffusers paths; ComfyUI's UNet uses LDM paths. The mapping
comes from ComfyUI's own conversion table (comfy.utils.unet_to_diffusers), the
same one its LoRA loader uses, so a layer is named identically by ApplyLiDB,
by the LoRA export and by ComfyUI when it loads that export.

Diffusion transformers (SD3.5, Flux.1, Flux.2, Z-Image, Qwen-Image) are read from
ComfyUI's LoRA key table for the loaded model (comfy.lora.model_lora_keys_unet): every
diffusers-named attention projection in it is a target, named by that diffusers key,
and where the table maps it to a row slice of a fused weight (Flux's qkv and linear1,
SD3's qkv, Z-Image's qkv) the target is that slice: q, k and v are separate layers.

ComfyUI internals this file relies on (check them on a ComfyUI upgrade):
* `comfy.utils.unet_to_diffusers(unet_config)` ({diffusers key: LDM key});
* `comfy.lora.model_lora_keys_unet(base_model, {})` ({LoRA key: weight key or
  (weight key, (dim, offset, length))}), with diffusers keys under `transformer.` (Flux,
  SD3, Qwen-Image) or `diffusion_model.` (Lumina 2 / Z-Image);
* `comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel` (what a UNet model is);
* `model.model.model_config` class names (SD3, Flux, FluxSchnell, Flux2, Lumina2, ZImage,
  QwenImage) for the family shown in messages and stored in LiDB files;
* ModelPatcher slice patches keyed `(weight key, (0, offset, length))`, as LoraLoader adds them;
* `model.model.diffusion_model`, `model.model.model_config.unet_config`;
* `clip.cond_stage_model.clip_l/clip_g/clip_h.transformer.<HF CLIP text model paths>`, each encoder's
  `options_default` ((layer, layer_idx, ...): which hidden state it returns) and `num_layers`,
  and `clip.layer_idx` (Set CLIP Last Layer);
* ModelPatcher weight keys `diffusion_model.<path>.weight` and `<clip path>.weight`;
* `comfy.weight_adapter.LoRAAdapter(loaded_keys, (up, down, alpha, mid, dora_scale, reshape))`,
  which ModelPatcher.add_patches applies as strength * (alpha / rank) * up @ down.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import comfy.lora
import comfy.utils

import torch

from hdb_core.errors import HDBError
from hdb_core.lidb.targets import (DIT_COMPONENTS, TE, TE1, TE2, UNET, LayerSpec, check_family, describe,
                                   find_attention_projections, is_dit_projection)
from hdb_core.lidb.weights import LiDB

SUPPORTED = "SD1.x, SD2.x, SDXL, SD3.5, Flux.1, Flux.2, Z-Image and Qwen-Image"


@dataclass(frozen=True)
class Target:
    spec: LayerSpec
    key: str  # the weight's key in the ModelPatcher's state dict
    rows: tuple[int, int] | None = None   # (offset, length) of a slice of a fused weight's output rows

    @property
    def patch_key(self):
        """The key ModelPatcher.add_patches takes: the weight key, or (key, (0, offset, length)) for a slice."""
        return self.key if self.rows is None else (self.key, (0, *self.rows))


# Model config classes of ComfyUI -> the family name users know (messages, LiDB and hypernet files).
_FAMILIES = {"SD3": "SD3.5", "Flux": "Flux.1", "FluxSchnell": "Flux.1", "FluxInpaint": "Flux.1",
             "Flux2": "Flux.2", "Lumina2": "Lumina 2", "ZImage": "Z-Image", "QwenImage": "Qwen-Image"}


def is_unet(model) -> bool:
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    return isinstance(model.model.diffusion_model, UNetModel)


def model_family(model) -> str | None:
    """'Flux.1', 'SD3.5', ... for a DiT; None for UNets (their family shows from the cross-attention width)."""
    if is_unet(model):
        return None
    name = type(model.model.model_config).__name__
    return _FAMILIES.get(name, name)


def model_targets(model) -> dict[str, Target]:
    """Canonical name -> Target for every attention projection of a ComfyUI MODEL (UNet or DiT)."""
    return unet_targets(model) if is_unet(model) else dit_targets(model)


def dit_targets(model) -> dict[str, Target]:
    """Canonical name -> Target for every attention projection of a diffusion transformer, from ComfyUI's
    LoRA key table: named by the table's diffusers key, q/k/v of fused weights as row slices."""
    base = model.model
    table = comfy.lora.model_lora_keys_unet(base, {})
    weights = set(base.state_dict())   # the table also lists layers a config leaves out (SD3's attn2, last proj)
    paths: dict[str, set[str]] = {c: set() for c in DIT_COMPONENTS}
    for key in table:
        prefix, _, path = key.partition(".")
        if prefix in paths:
            paths[prefix].add(path)
    chosen: dict[tuple, str] = {}          # (weight key, rows) -> canonical name; `transformer.` wins
    for component in DIT_COMPONENTS:
        for path in sorted(paths[component]):
            if not is_dit_projection(path, paths[component]):
                continue
            dest = table[f"{component}.{path}"]
            weight_key, rows = (dest, None) if isinstance(dest, str) else (dest[0], dest[1])
            if weight_key not in weights:
                continue
            if rows is not None:
                if rows[0] != 0:
                    continue                       # only row slices are LiDB layers
                rows = (int(rows[1]), int(rows[2]))
            chosen.setdefault((weight_key, rows), f"{component}.{path}")
    out = {}
    for (weight_key, rows), name in chosen.items():
        module = base.get_submodule(weight_key[: -len(".weight")])
        out_features, in_features = module.weight.shape[:2]
        out[name] = Target(LayerSpec(name, int(in_features), int(rows[1] if rows else out_features)),
                           weight_key, rows)
    return dict(sorted(out.items(), key=lambda kv: _natural(kv[0])))


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def unet_targets(model) -> dict[str, Target]:
    """Canonical name -> Target for every attention projection of a ComfyUI MODEL's UNet."""
    base = model.model
    to_comfy = comfy.utils.unet_to_diffusers(base.model_config.unet_config)
    to_diffusers = {v: k for k, v in to_comfy.items()}
    out = {}
    for path, lin in find_attention_projections(base.diffusion_model):
        diffusers_key = to_diffusers.get(path + ".weight")
        if diffusers_key is None:
            continue
        name = f"{UNET}.{diffusers_key[: -len('.weight')]}"
        out[name] = Target(LayerSpec(name, lin.in_features, lin.out_features), f"diffusion_model.{path}.weight")
    return out


_TE_ENCODERS = ("clip_l", "clip_g", "clip_h")


def _encoder_components(cond) -> dict[str, str]:
    """{ComfyUI encoder attribute: canonical component} of a CLIP's cond_stage_model."""
    present = [n for n in _TE_ENCODERS if hasattr(cond, n)]
    if set(present) == {"clip_l", "clip_g"}:
        return {"clip_l": TE1, "clip_g": TE2}
    return {n: TE for n in present}


def clip_targets(clip) -> dict[str, Target]:
    """Canonical name -> Target for every self-attention projection of a ComfyUI CLIP."""
    cond = clip.cond_stage_model
    prefix = _encoder_components(cond)
    out = {}
    for path, lin in find_attention_projections(cond):
        encoder, _, rest = path.partition(".")
        if encoder not in prefix or not rest.startswith("transformer."):
            continue
        name = f"{prefix[encoder]}.{rest[len('transformer.'):]}"
        out[name] = Target(LayerSpec(name, lin.in_features, lin.out_features), f"{path}.weight")
    return out


# Encoders whose pooled output (computed after the last layer) conditions the diffusion model:
# SDXL's OpenCLIP-bigG feeds the UNet's size/pooled embedding.
_POOLED_FEEDS_MODEL = {TE2}
_LAYER_NUMBER = re.compile(r"\.layers\.(\d+)\.")


def unused_clip_layers(clip, model=None) -> set[str]:
    """Canonical names of text-encoder layers whose output the connected CLIP never uses.

    An encoder read at an intermediate layer (SD2's penultimate layer, SDXL's CLIP-L, or any
    CLIP after Set CLIP Last Layer) never uses the layers after it, unless its pooled output
    (which passes every layer) conditions the model. Training such layers gets no gradient.
    """
    if model is not None and not is_unet(model):
        return set()      # DiTs read the CLIP encoders' pooled output (SD3.5: L and G, Flux.1: L): every layer counts
    cond = clip.cond_stage_model
    unused = set()
    for encoder, component in _encoder_components(cond).items():
        module = getattr(cond, encoder)
        if component in _POOLED_FEEDS_MODEL:
            continue
        layer, index = ("hidden", clip.layer_idx) if clip.layer_idx is not None else module.options_default[:2]
        if layer != "hidden" or index is None or abs(index) > module.num_layers:
            continue                                     # the last layer's output is used: all layers count
        last_used = index % module.num_layers
        for name in clip_targets(clip):
            number = _LAYER_NUMBER.search(name)
            if name.startswith(component + ".") and number and int(number.group(1)) > last_used:
                unused.add(name)
    return unused


def check_compatible(lidb: LiDB, targets: dict[str, Target], components: set[str], what: str,
                     family: str | None = None) -> None:
    """Every layer of the LiDB on `components` must exist in the model with the same shape
    (and a LiDB that names its family must meet a model of that family)."""
    check_family(lidb.info.get("family"), family, "This LiDB")
    wanted = [s for s in lidb.layers if s.component in components]
    bad = [s for s in wanted if s.name not in targets or targets[s.name].spec != s]
    if not bad:
        return
    made_for = describe(wanted, lidb.info.get("family"))
    have = describe([t.spec for t in targets.values()], family)
    hint = f" (its base-model hint: {lidb.info['base_model']})" if lidb.info.get("base_model") else ""
    raise HDBError(f"This LiDB was made for {made_for}{hint}, but the connected {what} has {have}: "
                   f"connect the base model the LiDB was made for, or make a LiDB for this one.")


def lora_patches(lidb: LiDB, targets: dict[str, Target], components: set[str]) -> dict:
    """ComfyUI weight patches (LoRAAdapter, scale 1) for the LiDB's layers on `components`."""
    from comfy.weight_adapter import LoRAAdapter

    patches = {}
    for spec in lidb.layers:
        if spec.component in components:
            down, up = lidb.down_up(spec.name)
            patches[targets[spec.name].patch_key] = LoRAAdapter(set(), (up, down, None, None, None, None))
    return patches


def target_modules(root: torch.nn.Module, targets: dict[str, Target], strip: str = "") -> dict:
    """Canonical name -> the Linear module (or (module, rows) for a fused slice), the injector's targets,
    from ModelPatcher keys like 'diffusion_model.x.to_q.weight'."""
    out = {}
    for name, t in targets.items():
        path = t.key[: -len(".weight")]
        if strip and path.startswith(strip):
            path = path[len(strip):]
        module = root.get_submodule(path)
        out[name] = module if t.rows is None else (module, t.rows)
    return out


def require_targets(targets: dict[str, Target], what: str, model=None) -> None:
    if targets:
        return
    if what == "model" and model is not None and not is_unet(model):
        name = type(model.model.model_config).__name__
        raise HDBError(f"The connected model ({name}) is a family HyperDreamBooth does not cover yet; it supports "
                       f"{SUPPORTED}.")
    raise HDBError(f"The connected {what} has no attention projections this pack can adapt; HyperDreamBooth "
                   f"supports {SUPPORTED}, and CLIP text encoders.")


def frozen_text_encoders(clip) -> list[str]:
    """Names of the CLIP's text encoders that are not CLIP-family (T5, Qwen, Llama, Mistral, Gemma): never targets."""
    cond = clip.cond_stage_model
    return [name for name, child in cond.named_children()
            if name not in _TE_ENCODERS and any(p.numel() for p in child.parameters())]
