"""The aux bases are the one part of a LiDB that is not stored: they must regenerate bit-identically."""
import json
import subprocess
import sys

import numpy as np
import torch

from hdb_core import aux_bases
from hdb_core.lidb import LiDBConfig, aux_checksum
from hdb_core.targets import LayerSpec

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
from hdb_core.lidb import LiDBConfig, aux_checksum
from hdb_core.targets import LayerSpec
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
