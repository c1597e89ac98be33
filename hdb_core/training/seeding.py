"""Random numbers keyed by what they are for, so that runs are reproducible piece by piece.

Training draws every random number (noise, timestep, image choice, flip) from a
fresh generator seeded by (run seed, identity or rank, step). Nothing depends on
how many steps or identities came before in the same process, so

* a batch of identities draws exactly what each identity would draw alone, and
* a run resumed from a checkpoint continues exactly as an uninterrupted one,

without saving or restoring any RNG state.
"""
from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts) -> int:
    """A 63-bit seed from any printable parts (stable across machines and Python versions)."""
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def generator(*parts) -> torch.Generator:
    """A CPU generator seeded from `parts`."""
    return torch.Generator().manual_seed(derive_seed(*parts))
