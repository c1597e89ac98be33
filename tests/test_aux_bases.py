"""The aux bases are the one part of a LiDB that is not stored: they must regenerate bit-identically."""
import json
import subprocess
import sys
import weakref

import numpy as np
import pytest
import torch

from bench.bench_aux_bases import per_layer_v1, per_layer_v1_pair
from hdb_core.lidb import aux_bases, weights
from hdb_core.lidb.weights import LiDBConfig, aux_checksum
from hdb_core.lidb.targets import LayerSpec

LAYERS = [LayerSpec("unet.a.attn1.to_q", 320, 320), LayerSpec("unet.a.attn2.to_k", 768, 320),
          LayerSpec("te.text_model.encoder.layers.0.self_attn.q_proj", 768, 768), LayerSpec("unet.tiny.to_v", 32, 32)]



def test_rows_are_orthonormal_and_use_every_coordinate():
    m = aux_bases.orthogonal_rows(100, 640, "probe")
    gram = m @ m.T
    assert np.abs(gram - np.eye(100)).max() < 1e-12
    assert (np.abs(m) > 1e-9).mean() > 0.99, "every vector should spread over all coordinates"
    # Entries look like a random rotation's: mean ~0, variance ~1/n.
    z = m.ravel() * np.sqrt(640)
    assert abs(z.mean()) < 0.05 and abs(z.std() - 1) < 0.05


def test_aux_pair_shapes_and_full_rank_when_layer_is_narrow():
    a_aux, b_aux = aux_bases.aux_pair(0, "x", in_features=32, out_features=48, a=32, b=48)
    assert a_aux.shape == (32, 32) and b_aux.shape == (48, 48)
    assert torch.allclose(a_aux.T @ a_aux, torch.eye(32), atol=1e-5)


def test_depends_on_seed_and_layer_name():
    base = aux_bases.orthogonal_rows(10, 64, aux_bases.layer_key(0, "l1", "A"))
    assert not np.allclose(base, aux_bases.orthogonal_rows(10, 64, aux_bases.layer_key(1, "l1", "A")))
    assert not np.allclose(base, aux_bases.orthogonal_rows(10, 64, aux_bases.layer_key(0, "l2", "A")))
    assert np.array_equal(base, aux_bases.orthogonal_rows(10, 64, aux_bases.layer_key(0, "l1", "A")))


_CHILD = """
import json, sys, torch
torch.set_num_threads(int(sys.argv[1]))
from hdb_core.lidb.weights import LiDBConfig, aux_checksum
from hdb_core.lidb.targets import LayerSpec
layers = [LayerSpec(*l) for l in json.loads(sys.argv[2])]
print(aux_checksum(LiDBConfig(seed=7), layers))
"""


def test_bit_identical_across_processes_and_thread_counts():
    spec = json.dumps([[l.name, l.in_features, l.out_features] for l in LAYERS])
    sums = set()
    for threads in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", _CHILD, threads, spec], capture_output=True, text=True,
                             check=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]),
                             env={**__import__("os").environ, "OMP_NUM_THREADS": threads})
        sums.add(out.stdout.strip())
    sums.add(aux_checksum(LiDBConfig(seed=7), LAYERS))
    assert len(sums) == 1, sums


def test_golden_checksum_is_stable():
    """Files store this checksum; a change here means every saved LiDB stops loading."""
    assert aux_checksum(LiDBConfig(seed=7), LAYERS) == "c0dd57cfada4f51c"


# -- batched generator == the generator as first written, bit for bit ---------------------------------

SHAPES = [(1, 1), (1, 2), (2, 2), (1, 9), (3, 7), (5, 5), (16, 33), (32, 32), (1, 64), (50, 320), (13, 255)]
TILINGS = {"default": {}, "column blocks": {"_TILE_ELEMS": 64}, "many layers a tile": {"_TILE_ELEMS": 1 << 22},
           "one key a chunk": {"_CHUNK_BYTES": 1}}


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("tiling", TILINGS)
def test_batched_equals_per_layer_reference(tiling, monkeypatch):
    for attr, value in TILINGS[tiling].items():
        monkeypatch.setattr(aux_bases, attr, value)
    names = ["unet.a.attn1.to_q", "unet.b.attn2.to_k", "te.text_model.encoder.layers.0.self_attn.q_proj"]
    for k, n in SHAPES:
        keys = [aux_bases.layer_key(seed, name, role) for seed in (0, 7) for name in names for role in "AB"]
        built = np.concatenate([cols for _, cols in aux_bases.orthogonal_columns(k, n, keys)])
        for key, cols in zip(keys, built, strict=True):
            assert _same_bits(np.ascontiguousarray(cols.T), per_layer_v1(k, n, key)), (k, n, key)
        assert _same_bits(aux_bases.orthogonal_rows(k, n, keys[0]), per_layer_v1(k, n, keys[0]))


def test_aux_pairs_equal_per_layer_pairs():
    layers = [("unet.x.to_q", 320, 320, 100, 50), ("unet.x.to_k", 768, 320, 100, 50),
              ("unet.y.to_q", 320, 320, 100, 50), ("te.q", 33, 17, 33, 17), ("te.k", 7, 1, 7, 1)]
    progress = []
    pairs = aux_bases.aux_pairs(3, layers, progress=lambda done, total: progress.append((done, total)))
    for (name, in_f, out_f, a, b), (a_aux, b_aux) in zip(layers, pairs, strict=True):
        ref_a, ref_b = per_layer_v1_pair(3, name, in_f, out_f, a, b)
        assert torch.equal(a_aux, ref_a) and torch.equal(b_aux, ref_b)
        assert a_aux.is_contiguous() and b_aux.is_contiguous()
    assert progress[-1] == (10, 10) and [d for d, _ in progress] == sorted(d for d, _ in progress)


def test_fast_stable_argsort_handles_ties():
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 2**63, size=(6, 40), dtype=np.int64).astype(np.uint64) * np.uint64(2)
    keys[1, 5] = keys[1, 17]                           # an exact tie
    keys[2, 3] = keys[2, 30] ^ np.uint64(1)            # equal high bits, different low bits
    keys[3] = np.uint64(42)                            # all equal
    keys[4, :20] = keys[4, 20:]
    for index in (None, np.arange(240, dtype=np.uint64).reshape(6, 40)):
        got = aux_bases._stable_argsort_rows(keys, index)
        want = np.argsort(keys, axis=1, kind="stable") + (0 if index is None else np.arange(6)[:, None] * 40)
        assert np.array_equal(got, want)


# -- the aux cache ---------------------------------------------------------------------------------------

@pytest.fixture
def fresh_cache():
    weights.clear_aux_cache()
    budget = weights.set_aux_cache_budget(weights.DEFAULT_AUX_CACHE_BYTES)
    yield
    weights.set_aux_cache_budget(budget)
    weights.clear_aux_cache()


def _layout(prefix: str, count: int = 4):
    return [LayerSpec(f"{prefix}.{i}.to_q", 64, 48) for i in range(count)]


def test_layout_is_built_in_one_batch(fresh_cache, monkeypatch):
    calls, real = [], aux_bases.aux_pairs

    def counting(seed, layers, **kw):
        calls.append(len(layers))
        return real(seed, layers, **kw)
    monkeypatch.setattr(aux_bases, "aux_pairs", counting)
    from hdb_core.lidb.weights import LiDB

    lidb = LiDB.zeros(_layout("unet.a", 5), LiDBConfig(a=8, b=4, seed=1))
    for spec in lidb.layers:
        lidb.down_up(spec.name)
    assert calls == [5]
    assert weights.aux_for(lidb.config, lidb.layers[2]) is lidb.aux(lidb.layers[2].name)
    assert aux_checksum(lidb.config, lidb.layers) == aux_bases.checksum(
        t for s in lidb.layers for t in per_layer_v1_pair(1, s.name, 64, 48, 8, 4))
    assert calls == [5]


def test_cache_keeps_to_its_budget_and_drops_other_layouts(fresh_cache):
    config = LiDBConfig(a=8, b=4)
    per_layer = 4 * (64 * 8 + 4 * 48)
    weights.set_aux_cache_budget(6 * per_layer)
    first = weights.aux_for_layers(config, _layout("unet.a"))
    assert weights.aux_cache_info() == {"bytes": 4 * per_layer, "budget": 6 * per_layer, "layers": 4}
    probe = weakref.ref(first["unet.a.0.to_q"][0])
    del first
    second = weights.aux_for_layers(config, _layout("unet.b"))   # a different architecture
    info = weights.aux_cache_info()
    assert info["bytes"] <= info["budget"] and info["layers"] == 6
    assert probe() is None, "the least recently used layout's bases should be gone"
    assert all(weights._AUX.get(weights._aux_key(config, s)) is not None for s in _layout("unet.b"))
    # A layout bigger than the budget is still returned whole; the cache keeps what fits.
    big = weights.aux_for_layers(config, _layout("unet.c", 9))
    assert len(big) == 9 and weights.aux_cache_info()["bytes"] <= 6 * per_layer
    probe = weakref.ref(second["unet.b.0.to_q"][1])
    del second, big
    weights.clear_aux_cache()
    assert weights.aux_cache_info()["bytes"] == 0 and probe() is None


def test_bases_built_under_inference_mode_are_normal_tensors(fresh_cache):
    """ComfyUI runs nodes under inference mode; a later finetune must still backprop through the bases."""
    config = LiDBConfig(a=8, b=4)
    with torch.inference_mode():
        aux = weights.aux_for_layers(config, _layout("unet.a", 2))
    a_aux, b_aux = aux["unet.a.0.to_q"]
    assert not a_aux.is_inference() and not b_aux.is_inference() and not a_aux.requires_grad
    a_train = torch.randn(8, 1, requires_grad=True)
    b_train = torch.randn(1, 4, requires_grad=True)
    down, up = weights.down_up_from(a_aux, b_aux, a_train, b_train)
    (up @ down).square().sum().backward()
    assert a_train.grad is not None and torch.isfinite(b_train.grad).all()
