"""Training checkpoints that survive SIGKILL: one safetensors file, written atomically.

Tensors (weights, optimizer moments) are stored as safetensors
tensors; everything else (step, settings, optimizer hyperparameters) as JSON in
the file's metadata. No pickle anywhere, so a checkpoint is as safe to open as
a model file. Because the whole checkpoint is one file renamed into place, a
reader sees either the previous checkpoint or the new one, never a mix.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from hdb_core.atomic import write_atomic
from hdb_core.errors import HDBError

FORMAT = "hyperdreambooth.checkpoint"
VERSION = 1


def save_checkpoint(path: str, tensors: dict[str, torch.Tensor], state: dict) -> str:
    """Write {tensors} plus the JSON-serialisable `state` to `path` atomically."""
    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {"format": FORMAT, "format_version": str(VERSION), "state": json.dumps(state, sort_keys=True)}
    return write_atomic(path, lambda tmp: save_file(flat, tmp, metadata=meta))


def load_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict] | None:
    """(tensors, state) of a checkpoint, or None when there is none at `path`."""
    if not os.path.exists(path):
        return None
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise HDBError(f"'{path}' is not a HyperDreamBooth training checkpoint; move it away or pick "
                               f"another output folder.")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return tensors, json.loads(meta["state"])
    except HDBError:
        raise
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise HDBError(f"Checkpoint '{path}' is damaged ({e}); delete it to start that part again.") from None


def prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix.` with the prefix removed."""
    p = prefix + "."
    return {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}


def optimizer_state(optimizer: torch.optim.Optimizer, prefix: str = "optim") -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state_dict flattened to (tensors, JSON): per-parameter tensors and scalars apart."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, entries in sd["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    groups = [{k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in g.items()}
              for g in sd["param_groups"]]
    return tensors, {"groups": groups, "scalars": scalars}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict,
                         prefix: str = "optim") -> None:
    state: dict[int, dict] = {}
    for key, value in prefixed(tensors, prefix).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    groups = []
    for g in meta["groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    optimizer.load_state_dict({"state": state, "param_groups": groups})
