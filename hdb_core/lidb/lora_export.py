"""Conversion of a LiDB to a standard LoRA file.

A LiDB's residual already is a rank-r LoRA: down = (A_aux A_train)^T and
up = (B_train B_aux)^T, so the export is exact (no SVD).

* UNet LiDBs (SD1.x, SD2.x, SDXL): kohya's `lora_unet_*` / `lora_te_*` (`lora_te1_`/`lora_te2_`
  for SDXL) keys, `.lora_down/.lora_up.weight`, alpha = rank, i.e. a scale of 1.
* DiT LiDBs (SD3.5, Flux.1/.2, Z-Image, Qwen-Image): the diffusers/PEFT layout that diffusers,
  ai-toolkit and ComfyUI read: `<diffusers key>.lora_A.weight` (down) and `.lora_B.weight` (up),
  no alpha (scale 1). One key per q, k and v, so a fused qkv gets three slice LoRAs, exactly
  as the LiDB trains them; kohya keys can only address the whole fused weight.

Either way `W + strength * up @ down` everywhere.
"""
from __future__ import annotations

import torch
from safetensors.torch import save_file

from hdb_core.atomic import write_atomic
from hdb_core.lidb.weights import LiDB
from hdb_core.lidb.targets import TEXT_ENCODERS, is_dit, lora_key, unet_family


def to_kohya(lidb: LiDB, dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and ss_* metadata of the kohya LoRA equivalent to `lidb`."""
    rank = lidb.config.rank + lidb.free_rank     # the free LoRA part adds rank; the export stays exact
    tensors = {}
    dit = is_dit(lidb.layers)
    for spec in lidb.layers:
        down, up = lidb.down_up(spec.name)
        key = lora_key(spec.name, dit)
        if dit:
            tensors[f"{key}.lora_A.weight"] = down.to(dtype).contiguous()
            tensors[f"{key}.lora_B.weight"] = up.to(dtype).contiguous()
            continue
        tensors[f"{key}.lora_down.weight"] = down.to(dtype).contiguous()
        tensors[f"{key}.lora_up.weight"] = up.to(dtype).contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(float(rank), dtype=dtype)
    has_te = any(s.component in TEXT_ENCODERS for s in lidb.layers)
    family = unet_family(lidb.layers)
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(rank),
        "ss_base_model_version": family[1] if family else (lidb.info.get("family") or "unknown"),
        "ss_network_args": "{}",
        "ss_training_comment": (f"Exported from a HyperDreamBooth LiDB ({lidb.info.get('source') or 'unknown'}); "
                                f"trigger: {lidb.info.get('trigger') or '-'}"),
        "ss_text_encoder_lr": "" if has_te else "0",
        "hdb_trigger": lidb.info.get("trigger", ""),
    }
    if dit:
        meta["hdb_key_format"] = "diffusers (PEFT lora_A/lora_B, scale 1)"
        meta["hdb_family"] = lidb.info.get("family", "")
    return tensors, meta


def save_kohya(lidb: LiDB, path: str, dtype: torch.dtype = torch.float32) -> str:
    tensors, meta = to_kohya(lidb, dtype)
    return write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
