"""LiDB files: exact round trip, compact layout, and one-sentence errors for every bad file."""
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hdb_core.errors import HDBError
from hdb_core.lidb.file import load_lidb, lidb_to_safetensors, save_lidb
from test_lidb_core import random_lidb


def test_round_trip_is_bit_exact_and_keeps_provenance(tmp_path):
    lidb = random_lidb(rank=2).with_info(trigger="a sks face", source="finetuned", base_model="SD1.5")
    path = save_lidb(lidb, str(tmp_path / "id.safetensors"))
    back = load_lidb(path)
    assert back.layers == lidb.layers and back.config == lidb.config
    assert all(torch.equal(back.a_train[k], lidb.a_train[k]) and torch.equal(back.b_train[k], lidb.b_train[k])
               for k in lidb.a_train)
    assert back.info == {"trigger": "a sks face", "source": "finetuned", "base_model": "SD1.5"}
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        assert len(list(f.keys())) <= 2 * 3  # stacked by shape group, not two tensors per layer
    assert meta["format"] == "hyperdreambooth.lidb" and meta["aux_checksum"] == lidb.aux_checksum()
    assert json.loads(meta["layers"])[0] == [lidb.layers[0].name, 320, 320]


def test_no_temp_files_left_behind(tmp_path):
    save_lidb(random_lidb(), str(tmp_path / "a.safetensors"))
    assert os.listdir(tmp_path) == ["a.safetensors"]


def _write(tmp_path, tensors, meta):
    path = str(tmp_path / "bad.safetensors")
    save_file(tensors, path, metadata=meta)
    return path


@pytest.mark.parametrize("case, expect", [
    ("truncated", "truncated or corrupt"),
    ("garbage", "truncated or corrupt"),
    ("plain_lora", "not a LiDB"),
    ("nan", "NaN or Inf"),
    ("newer_version", "newer than this pack"),
    ("tampered_seed", "aux-basis checksum"),
    ("missing_tensor", "missing the train matrices"),
    ("bad_layers_json", "damaged LiDB metadata"),
    ("missing", "does not exist"),
])
def test_bad_files_give_one_sentence_errors(tmp_path, case, expect):
    tensors, meta = lidb_to_safetensors(random_lidb())
    good = save_lidb(random_lidb(), str(tmp_path / "good.safetensors"))
    if case == "truncated":
        data = open(good, "rb").read()
        path = str(tmp_path / "t.safetensors")
        open(path, "wb").write(data[: len(data) // 2])
    elif case == "garbage":
        path = str(tmp_path / "g.safetensors")
        open(path, "wb").write(b"\x00\x01not a safetensors file at all")
    elif case == "plain_lora":
        path = _write(tmp_path, {"lora_unet_x.lora_down.weight": torch.zeros(1, 4)}, {"ss_network_dim": "1"})
    elif case == "nan":
        key = next(iter(tensors))
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] = float("nan")
        path = _write(tmp_path, tensors, meta)
    elif case == "newer_version":
        path = _write(tmp_path, tensors, {**meta, "format_version": "99"})
    elif case == "tampered_seed":
        path = _write(tmp_path, tensors, {**meta, "seed": "4"})
    elif case == "missing_tensor":
        tensors.pop(next(k for k in tensors if k.startswith("b_train")))
        path = _write(tmp_path, tensors, meta)
    elif case == "bad_layers_json":
        path = _write(tmp_path, tensors, {**meta, "layers": "[[1, 2"})
    else:
        path = str(tmp_path / "nope.safetensors")
    with pytest.raises(HDBError) as err:
        load_lidb(path)
    msg = str(err.value)
    assert expect in msg and msg.count(". ") == 0 and msg.endswith("."), msg


def test_refuses_to_save_nan(tmp_path):
    lidb = random_lidb()
    lidb.a_train[lidb.layers[0].name] = torch.full_like(lidb.a_train[lidb.layers[0].name], float("inf"))
    with pytest.raises(HDBError, match="NaN or Inf"):
        save_lidb(lidb, str(tmp_path / "x.safetensors"))
    assert os.listdir(tmp_path) == []
