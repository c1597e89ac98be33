"""Reading this pack's .safetensors files (LiDBs, hypernetworks) with one-sentence errors.

Both formats carry `format`, `format_version` and `aux_generator` metadata; the
checks and the wording for unreadable or too-new files live here once.
"""
from __future__ import annotations

import os
from typing import Callable, Mapping

import torch
from safetensors import SafetensorError, safe_open

from hdb_core.lidb import aux_bases
from hdb_core.errors import HDBError


def file_error(path: str, why: str) -> HDBError:
    """'<file name> <why>': every message names the file the user picked."""
    return HDBError(f"'{os.path.basename(path)}' {why}")


def read(path: str, check_meta: Callable[[Mapping[str, str]], None], folder_hint: str, redo_hint: str,
         tensors: bool = True) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors file; `check_meta` runs before any tensor is read."""
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            check_meta(meta)
            data = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except HDBError:
        raise
    except FileNotFoundError:
        raise file_error(path, f"does not exist; put {folder_hint}.") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise file_error(path, f"is not a readable safetensors file (truncated or corrupt: {e}); "
                               f"{redo_hint}.") from None
    return meta, data


def check_version(path: str, meta: Mapping[str, str], what: str, latest: int) -> None:
    """format_version within what this pack reads, and an aux-basis generator it knows."""
    try:
        version = int(meta.get("format_version", "0"))
    except ValueError:
        version = 0
    if version > latest:
        raise file_error(path, f"uses {what} format version {version}, newer than this pack reads ({latest}); "
                               f"update ComfyUI-HyperDreamBooth.")
    if version < 1:
        raise file_error(path, f"has an invalid {what} format version; it was not written by ComfyUI-HyperDreamBooth.")
    if meta.get("aux_generator") != aux_bases.GENERATOR_VERSION:
        raise file_error(path, f"was made with aux-basis generator {meta.get('aux_generator')!r}, which this version "
                               f"does not know ({aux_bases.GENERATOR_VERSION}); update ComfyUI-HyperDreamBooth.")
