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

One implementation serves one layer and many: `orthogonal_columns` builds every
layer of one (k, n) shape at once (vectorised over layers, tiled for the
cache; ~3x faster than one layer at a time for a full model), and
`orthogonal_rows` is its one-layer call. Batching changes how the elementwise
operations are scheduled, never their values: each product and sum is the same
correctly rounded IEEE operation on the same operands, up to exact rewrites
(a - b as a + (-b); two power-of-two scalings as one). The float work runs on
torch's CPU elementwise kernels (index_select, mul, add): one operation per
element, no reduction, and add's a + alpha*b with alpha = 1 is exactly a + b
even where a kernel fuses it. So each layer's result is bit for bit what the
generator as first written gives (tests/test_aux_bases.py holds it to that copy,
kept in bench/bench_aux_bases.py, and to a golden checksum).
"""
from __future__ import annotations

import hashlib
import math
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

GENERATOR_VERSION = "hdb-aux-v1"
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)

# Layers of one shape are built in chunks of bounded memory (at most _CHUNK_BYTES of random
# choices, and _CHUNK_DRAW values drawn per rotation layer so that drawing stays in cache), and
# each chunk in tiles of about _TILE_ELEMS float64 values: big enough that per-call overhead is
# small, small enough that a tile's buffers stay near the core (best measured: 160k-320k).
_CHUNK_BYTES = 48 << 20
_CHUNK_DRAW = 48 * 1024
_TILE_ELEMS = 160 * 1024


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 counters (wrapping integer math only), in place."""
    with np.errstate(over="ignore"):
        z += np.uint64(0x9E3779B97F4A7C15)
        t = z >> np.uint64(30)
        z ^= t
        z *= np.uint64(0xBF58476D1CE4E5B9)
        np.right_shift(z, np.uint64(27), out=t)
        z ^= t
        z *= np.uint64(0x94D049BB133111EB)
        np.right_shift(z, np.uint64(31), out=t)
        z ^= t
        return z


class _Streams:
    """Counter-based random streams, one per key, advanced in lockstep (one row per key)."""

    def __init__(self, keys: Sequence[str]):
        self.base = np.array([int.from_bytes(hashlib.sha256(k.encode("utf-8")).digest()[:8], "little")
                              for k in keys], dtype=np.uint64)
        self.counter = 0

    def bits(self, count: int) -> np.ndarray:
        idx = np.arange(self.counter, self.counter + count, dtype=np.uint64)
        self.counter += count
        with np.errstate(over="ignore"):
            return _splitmix64(idx[None, :] + self.base[:, None])  # a fresh array, mixed in place

    def permutation(self, n: int) -> np.ndarray:
        """Per stream, the stable argsort of n fresh 64-bit keys."""
        return _stable_argsort_rows(self.bits(n))


def _stable_argsort_rows(keys: np.ndarray, index: np.ndarray | None = None) -> np.ndarray:
    """index[row][np.argsort(keys[row], kind="stable")] for every row of [rows, n] uint64 keys
    (index: uint64 [rows, n], by default 0..n-1), about 10x faster for random keys.

    A stable argsort of uint64 is a merge sort (~40 ns a key). Instead each key's low bits are
    replaced by its index and the packed values are sorted (SIMD sort, values all distinct):
    where the kept high bits of a row are all distinct that is the same order, ties included.
    Rows where two keys share their high bits (odds below 1e-8 a row) take the stable argsort.
    """
    if index is None:
        index = np.arange(keys.shape[1], dtype=np.uint64)[None, :]
    shift = np.uint64(max(1, int(index.max()).bit_length()))
    low = np.uint64((1 << int(shift)) - 1)
    packed = np.sort((keys & ~low) | index, axis=1)
    order = (packed & low).view(np.int64)  # indices < 2^63: the same bits as int64
    packed >>= shift
    for row in np.flatnonzero((packed[:, 1:] == packed[:, :-1]).any(axis=1)):
        order[row] = np.broadcast_to(index, keys.shape)[row][np.argsort(keys[row], kind="stable")]
    return order


def _rotation_layers(n: int) -> int:
    """Butterfly depth: enough random pairings to spread every vector over n coords."""
    return 3 * max(1, math.ceil(math.log2(max(n, 2)))) + 2


def _network(k: int, n: int, keys: Sequence[str], per_tile: int):
    """Every random choice of len(keys) networks, drawn from each key's stream in the order the
    generator defines: n bits for the start permutation, k for the signs, then per rotation
    layer n bits for the pairing and n // 2 for the angles (t = top 53 bits * 2^-52 - 1).

    The data is kept in a moving row order: before rotation layer l it is gathered so that the
    pairs (perm[m], perm[half + m]) sit at rows m and half + m, which turns two gathers and two
    scatters per layer into one contiguous row gather. gathers[l] and final index the rows of
    the [per_tile * n, columns] data of the tile that holds the key (tiles hold per_tile keys);
    coef[l] holds the rotation as products to add: out_i = c*x_i + (-s)*x_j and
    out_j = s*x_i + c*x_j. Adding the product with -s is bit for bit the subtraction
    c*x_i - s*x_j (IEEE defines a - b as a + (-b)).
    """
    streams = _Streams([f"{GENERATOR_VERSION}|{key}|{k}x{n}" for key in keys])
    count, half, depth = len(keys), n // 2, _rotation_layers(n)
    start = streams.permutation(n)[:, :k]
    signs = np.where(streams.bits(k) & np.uint64(1), -1.0, 1.0)
    gathers = np.empty((depth, count, n), dtype=np.int64)
    coef = np.empty((depth, count, 2, 2, half), dtype=np.float64)  # [layer, key, in, out, pair]
    # Coordinates are numbered flat over the chunk (key * n + coordinate); rows within the tile.
    flat = np.arange(count * n, dtype=np.uint64).reshape(count, n)
    tile_rows = np.arange(count * n) % (per_tile * n)
    row_of = tile_rows.copy()  # row_of[flat coordinate]: its row now; the order starts as the identity
    for layer in range(depth):
        bits = streams.bits(n + half)
        perm = _stable_argsort_rows(bits[:, :n], flat)
        # As first written: (bits * 2^-53) * 2.0 - 1.0. Both scalings are exact, so they fold
        # into one exact * 2^-52 and only the subtraction rounds, as there.
        t = (bits[:, n:] >> np.uint64(11)).astype(np.float64) * (2.0 ** -52) - 1.0  # (-1, 1)
        t2 = t * t
        denom = 1.0 + t2
        c = (1.0 - t2) / denom
        s = (2.0 * t) / denom
        coef[layer, :, 0, 0] = coef[layer, :, 1, 1] = c
        coef[layer, :, 1, 0] = -s
        coef[layer, :, 0, 1] = s
        np.take(row_of, perm, out=gathers[layer])
        row_of[perm.ravel()] = tile_rows
    final = row_of.reshape(count, n)
    return start, signs, gathers, coef, final


def _chunk_layers(k: int, n: int) -> int:
    """How many layers of shape (k, n) one chunk holds: within _CHUNK_BYTES, and few enough
    that drawing one rotation layer for all of them stays in cache (_CHUNK_DRAW values)."""
    per_layer = _rotation_layers(n) * n * 24 + n * k * 8
    return max(1, min(_CHUNK_BYTES // per_layer, _CHUNK_DRAW // n))


Sink = Callable[[int, int, int, torch.Tensor], None]


def _run_network(k: int, n: int, keys: Sequence[str], sink: Sink) -> None:
    """Build len(keys) bases of shape (k, n), handing each finished block to
    sink(first key, first column, columns, [keys, n, columns] float64 in coordinate order)."""
    # Tiles of about _TILE_ELEMS: several whole layers, or one layer's columns in blocks. Columns
    # are independent (each sees the same rotations), so a tile runs every rotation layer before
    # the next tile starts, and its buffers stay in cache.
    blocks = -(-n * k // _TILE_ELEMS)
    cols = -(-k // blocks)
    per_tile = max(1, _TILE_ELEMS // (n * k)) if blocks == 1 else 1
    start, signs, gathers, coef, final = _network(k, n, keys, per_tile)
    count, half, depth = len(keys), n // 2, gathers.shape[0]
    # One workspace for every tile: two data buffers and the products.
    size = per_tile * n * cols
    work = torch.empty(4 * size, dtype=torch.float64)
    for l0 in range(0, count, per_tile):
        l1 = min(count, l0 + per_tile)
        u = l1 - l0
        # Views, no copies (fresh memory per tile would pay its page faults again and again).
        gs = torch.from_numpy(gathers[:, l0:l1].reshape(depth, u * n)).unbind(0)
        back = torch.from_numpy(final[l0:l1].reshape(u * n))
        cfs = torch.from_numpy(coef[:, l0:l1]).transpose(1, 2).unsqueeze(-1).unbind(0)  # [in, u, out, half, 1]
        for c0 in range(0, k, cols):
            w = min(cols, k - c0)
            m = u * n * w
            bufs = [work[:m].view(u * n, w), work[size:size + m].view(u * n, w)]
            prod = work[2 * size:2 * size + 4 * u * half * w].view(2, u, 2, half, w)
            bufs[0].zero_()
            first = bufs[0].numpy().reshape(u, n, w)
            first[np.arange(u)[:, None], start[l0:l1, c0:c0 + w], np.arange(w)] = signs[l0:l1, c0:c0 + w]
            # Each buffer's pairs as [u, in, half, w], and the same as [in, u, 1, half, w].
            pairs = [b.view(u, n, w)[:, :2 * half].unflatten(1, (2, half)) for b in bufs]
            ins = [p.transpose(0, 1).unsqueeze(2) for p in pairs]
            p0, p1 = prod[0], prod[1]
            src = 0
            for layer in range(depth):
                torch.index_select(bufs[src], 0, gs[layer], out=bufs[1 - src])
                src = 1 - src
                # One multiply for the four products, one add for the two sums: each element
                # still gets its own correctly rounded product and sum, as in the reference.
                torch.mul(cfs[layer], ins[src], out=prod)
                torch.add(p0, p1, out=pairs[src])
            torch.index_select(bufs[src], 0, back, out=bufs[1 - src])
            sink(l0, c0, w, bufs[1 - src].view(u, n, w))


def _check_shape(k: int, n: int) -> None:
    if not 0 < k <= n:
        raise ValueError(f"cannot build {k} orthogonal rows in dimension {n}")


def orthogonal_columns(k: int, n: int, keys: Sequence[str]) -> Iterator[tuple[int, np.ndarray]]:
    """Per chunk of keys: (offset, [chunk, n, k] float64), where [b, :, j] is the j-th orthonormal
    vector of keys[offset + b]. Memory stays within one chunk and its output."""
    _check_shape(k, n)
    keys = list(keys)
    step = _chunk_layers(k, n)
    for offset in range(0, len(keys), step):
        part = keys[offset:offset + step]
        out = np.empty((len(part), n, k), dtype=np.float64)

        def sink(l0, c0, w, block, out=out):
            out[l0:l0 + block.shape[0], :, c0:c0 + w] = block.numpy()
        _run_network(k, n, part, sink)
        yield offset, out


def orthogonal_rows(k: int, n: int, key: str) -> np.ndarray:
    """k orthonormal rows of length n (k <= n), float64, deterministic in `key`."""
    (_, cols), = orthogonal_columns(k, n, [key])
    return np.ascontiguousarray(cols[0].T)


def layer_key(seed: int, layer: str, role: str) -> str:
    return f"{int(seed)}|{role}|{layer}"


def aux_pairs(seed: int, layers: Sequence[tuple[str, int, int, int, int]], dtype: torch.dtype = torch.float32,
              progress: Callable[[int, int], None] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """aux_pair for many layers (name, in, out, a, b) at once: the bases of one shape are built
    together. progress(done, total) follows each chunk, counting bases (two a layer)."""
    groups: dict[tuple[int, int], list[tuple[int, int]]] = {}  # (k, n) -> [(layer, 0 = A / 1 = B)]
    for i, (_, in_f, out_f, a, b) in enumerate(layers):
        _check_shape(a, in_f)
        _check_shape(b, out_f)
        groups.setdefault((a, in_f), []).append((i, 0))
        groups.setdefault((b, out_f), []).append((i, 1))
    result = [[None, None] for _ in layers]
    total, done = 2 * len(layers), 0
    for (k, n), members in groups.items():
        step = _chunk_layers(k, n)
        for offset in range(0, len(members), step):
            part = members[offset:offset + step]
            # A_aux [in, a] holds the vectors as columns, B_aux [b, out] as rows.
            outs = [torch.empty((n, k) if role == 0 else (k, n), dtype=dtype) for _, role in part]

            def sink(l0, c0, w, block, part=part, outs=outs):
                for (_, role), out, data in zip(part[l0:], outs[l0:], block, strict=False):
                    (out[:, c0:c0 + w] if role == 0 else out[c0:c0 + w].T).copy_(data)
            _run_network(k, n, [layer_key(seed, layers[i][0], "AB"[role]) for i, role in part], sink)
            for (i, role), out in zip(part, outs, strict=True):
                result[i][role] = out
            done += len(part)
            if progress is not None:
                progress(done, total)
    return [(a, b) for a, b in result]


def aux_pair(seed: int, layer: str, in_features: int, out_features: int, a: int, b: int,
             dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_aux [in, a], B_aux [b, out]) for one layer, on the CPU.

    A_aux's columns and B_aux's rows are orthonormal vectors: down = (A_aux @ A_train)^T
    lives in an a-dim random subspace of the input space, up in a b-dim one of the output.
    """
    (pair,) = aux_pairs(seed, [(layer, in_features, out_features, a, b)], dtype)
    return pair


def checksum(tensors: Iterable[torch.Tensor]) -> str:
    """sha256 over the little-endian float32 bytes, in the given order (16 hex chars)."""
    h = hashlib.sha256()
    for t in tensors:
        arr = t.detach().to("cpu", torch.float32).contiguous().numpy()
        h.update(arr.astype("<f4", copy=False).tobytes())
    return h.hexdigest()[:16]
