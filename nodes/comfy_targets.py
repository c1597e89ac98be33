"""Map a loaded ComfyUI MODEL / CLIP to canonical LiDB layer names.

Canonical names are diffusers paths; ComfyUI's UNet uses LDM paths. The mapping
comes from ComfyUI's own conversion table (comfy.utils.unet_to_diffusers), the
same one its LoRA loader uses, so a layer is named identically by ApplyLiDB,
by the LoRA export and by ComfyUI when it loads that export.
"""
from __future__ import annotations

from dataclasses import dataclass

import comfy.utils

from ..hdb_core.errors import HDBError
from ..hdb_core.lidb import LiDB
from ..hdb_core.targets import LayerSpec, describe, find_attention_projections


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
        name = "unet." + diffusers_key[: -len(".weight")]
        out[name] = Target(LayerSpec(name, lin.in_features, lin.out_features), f"diffusion_model.{path}.weight")
    return out


_TE_ENCODERS = ("clip_l", "clip_g", "clip_h")


def clip_targets(clip) -> dict[str, Target]:
    """Canonical name -> Target for every self-attention projection of a ComfyUI CLIP."""
    cond = clip.cond_stage_model
    present = [n for n in _TE_ENCODERS if hasattr(cond, n)]
    if set(present) == {"clip_l", "clip_g"}:
        prefix = {"clip_l": "te1", "clip_g": "te2"}
    else:
        prefix = {n: "te" for n in present}
    out = {}
    for path, lin in find_attention_projections(cond):
        encoder, _, rest = path.partition(".")
        if encoder not in prefix or not rest.startswith("transformer."):
            continue
        name = f"{prefix[encoder]}.{rest[len('transformer.'):]}"
        out[name] = Target(LayerSpec(name, lin.in_features, lin.out_features), f"{path}.weight")
    return out


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


def model_description(model=None, clip=None) -> str:
    specs = []
    if model is not None:
        specs += [t.spec for t in unet_targets(model).values()]
    if clip is not None:
        specs += [t.spec for t in clip_targets(clip).values()]
    return describe(specs)


def require_targets(targets: dict[str, Target], what: str) -> None:
    if not targets:
        raise HDBError(f"The connected {what} has no attention projections this pack can adapt; "
                       f"HyperDreamBooth supports UNet-based Stable Diffusion (SD1.x, SD2.x, SDXL) and CLIP text encoders.")
