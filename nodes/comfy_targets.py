"""Map a loaded ComfyUI MODEL / CLIP to canonical LiDB layer names, modules and weight patches.

Canonical names are diffusers paths; ComfyUI's UNet uses LDM paths. The mapping
comes from ComfyUI's own conversion table (comfy.utils.unet_to_diffusers), the
same one its LoRA loader uses, so a layer is named identically by ApplyLiDB,
by the LoRA export and by ComfyUI when it loads that export.

ComfyUI internals this file relies on (check them on a ComfyUI upgrade):
* `comfy.utils.unet_to_diffusers(unet_config)` ({diffusers key: LDM key});
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

import comfy.utils

import torch

from hdb_core.errors import HDBError
from hdb_core.lidb.targets import TE, TE1, TE2, UNET, LayerSpec, describe, find_attention_projections
from hdb_core.lidb.weights import LiDB


@dataclass(frozen=True)
class Target:
    spec: LayerSpec
    key: str  # the weight's key in the ModelPatcher's state dict


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


def unused_clip_layers(clip) -> set[str]:
    """Canonical names of text-encoder layers whose output the connected CLIP never uses.

    An encoder read at an intermediate layer (SD2's penultimate layer, SDXL's CLIP-L, or any
    CLIP after Set CLIP Last Layer) never uses the layers after it, unless its pooled output
    (which passes every layer) conditions the model. Training such layers gets no gradient.
    """
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


def check_compatible(lidb: LiDB, targets: dict[str, Target], components: set[str], what: str) -> None:
    """Every layer of the LiDB on `components` must exist in the model with the same shape."""
    wanted = [s for s in lidb.layers if s.component in components]
    bad = [s for s in wanted if s.name not in targets or targets[s.name].spec != s]
    if not bad:
        return
    made_for = describe(wanted)
    have = describe([t.spec for t in targets.values()])
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
            patches[targets[spec.name].key] = LoRAAdapter(set(), (up, down, None, None, None, None))
    return patches


def target_modules(root: torch.nn.Module, targets: dict[str, Target], strip: str = "") -> dict[str, torch.nn.Module]:
    """Canonical name -> the Linear module, from ModelPatcher keys like 'diffusion_model.x.to_q.weight'."""
    out = {}
    for name, t in targets.items():
        path = t.key[: -len(".weight")]
        if strip and path.startswith(strip):
            path = path[len(strip):]
        out[name] = root.get_submodule(path)
    return out


def require_targets(targets: dict[str, Target], what: str) -> None:
    if not targets:
        raise HDBError(f"The connected {what} has no attention projections this pack can adapt; "
                       f"HyperDreamBooth supports UNet-based Stable Diffusion (SD1.x, SD2.x, SDXL) "
                       f"and CLIP text encoders.")
