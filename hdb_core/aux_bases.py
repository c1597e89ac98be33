"""Frozen random orthogonal bases of LiDB, regenerated from a seed.

A LiDB file stores only the small train matrices; the aux bases are rebuilt on
load from (seed, layer name, shape). That only works if the rebuild is
bit-identical everywhere, so this module avoids everything whose rounding can
vary between machines, thread counts or library versions: no library RNG, no
BLAS, no reductions, no transcendental functions. It uses

* SplitMix64 on integer counters (exact integer arithmetic) for randomness;
* a butterfly network of random Givens rotations, each a 2x2 rotation with
  c = (1-t^2)/(1+t^2), s = 2t/(1+t^2), applied with separate IEEE multiplies
  and adds (each correctly rounded, so identical on every machine).

Rotating k standard basis vectors by an orthogonal network gives k orthonormal
vectors (to ~1e-15) spread over all n coordinates: a random orthogonal
incomplete basis with rows of constant (unit) norm, as the paper asks.
"""
from __future__ import annotations

import hashlib
import math
from typing import Iterable

import numpy as np
import torch

GENERATOR_VERSION = "hdb-aux-v1"
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 counters (wrapping integer math only)."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


class _Stream:
    """Counter-based random stream keyed by a string."""

    def __init__(self, key: str):
        digest = hashlib.sha256(key.encode("utf-8")).digest()
        self.base = np.uint64(int.from_bytes(digest[:8], "little"))
        self.counter = 0

    def bits(self, count: int) -> np.ndarray:
        idx = np.arange(self.counter, self.counter + count, dtype=np.uint64)
        self.counter += count
        with np.errstate(over="ignore"):
            return _splitmix64(idx + self.base)

    def uniform(self, count: int) -> np.ndarray:
        """Doubles in [0, 1): the top 53 bits scaled by 2^-53 (exact)."""
        return (self.bits(count) >> np.uint64(11)).astype(np.float64) * (2.0 ** -53)

    def permutation(self, n: int) -> np.ndarray:
        # argsort of distinct 64-bit keys; stable sort makes ties deterministic too.
        return np.argsort(self.bits(n), kind="stable")


def _rotation_layers(n: int) -> int:
    """Butterfly depth: enough random pairings to spread every vector over n coords."""
    return 3 * max(1, math.ceil(math.log2(max(n, 2)))) + 2


def orthogonal_rows(k: int, n: int, key: str) -> np.ndarray:
    """k orthonormal rows of length n (k <= n), float64, deterministic in `key`."""
    if not 0 < k <= n:
        raise ValueError(f"cannot build {k} orthogonal rows in dimension {n}")
    stream = _Stream(f"{GENERATOR_VERSION}|{key}|{k}x{n}")
    # Work on the transpose [n, k] so that gathering coordinates reads whole rows.
    mt = np.zeros((n, k), dtype=np.float64)
    # Start from k random distinct coordinates with random signs.
    start = stream.permutation(n)[:k]
    signs = np.where(stream.bits(k) & np.uint64(1), -1.0, 1.0)
    mt[start, np.arange(k)] = signs
    half = n // 2
    for _ in range(_rotation_layers(n)):
        perm = stream.permutation(n)
        i, j = perm[:half], perm[half: 2 * half]
        t = stream.uniform(half) * 2.0 - 1.0  # (-1, 1): angles in (-90, 90) degrees
        t2 = t * t
        denom = 1.0 + t2
        c = ((1.0 - t2) / denom)[:, None]
        s = ((2.0 * t) / denom)[:, None]
        xi, xj = mt[i], mt[j]
        # Separate products and sums: every operation is one correctly rounded IEEE op.
        mt[i] = (c * xi) - (s * xj)
        mt[j] = (s * xi) + (c * xj)
    return np.ascontiguousarray(mt.T)


def layer_key(seed: int, layer: str, role: str) -> str:
    return f"{int(seed)}|{role}|{layer}"


def aux_pair(seed: int, layer: str, in_features: int, out_features: int, a: int, b: int,
             dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_aux [in, a], B_aux [b, out]) for one layer, on the CPU.

    A_aux's columns and B_aux's rows are orthonormal vectors: down = (A_aux @ A_train)^T
    lives in an a-dim random subspace of the input space, up in a b-dim one of the output.
    """
    a_rows = orthogonal_rows(a, in_features, layer_key(seed, layer, "A"))
    b_rows = orthogonal_rows(b, out_features, layer_key(seed, layer, "B"))
    return (torch.from_numpy(a_rows.T.copy()).to(dtype), torch.from_numpy(b_rows).to(dtype))


def checksum(tensors: Iterable[torch.Tensor]) -> str:
    """sha256 over the little-endian float32 bytes, in the given order (16 hex chars)."""
    h = hashlib.sha256()
    for t in tensors:
        arr = t.detach().to("cpu", torch.float32).contiguous().numpy()
        h.update(arr.astype("<f4", copy=False).tobytes())
    return h.hexdigest()[:16]
