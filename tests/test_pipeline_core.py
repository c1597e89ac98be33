"""Training-pipeline building blocks on real diffusers/transformers models: dataset scanning,
offline base-model loading, checkpoints."""
from __future__ import annotations

import os

import pytest
import torch

from hdb_core.training import data
from hdb_core.training.base_model import load_base_model
from hdb_core.training.checkpoint import (load_checkpoint, load_optimizer_state, optimizer_state, prefixed,
                                 save_checkpoint)
from hdb_core.errors import HDBError

from tests.pipeline_fixtures import make_faces


# -- dataset ------------------------------------------------------------------------------------
def test_scan_reads_both_layouts_and_skips_bad_files(tmp_path):
    make_faces(str(tmp_path), 2)
    make_faces(str(tmp_path), 2, per_folder=3, start=2)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "thumb.png")
    (tmp_path / "notes.txt").write_text("ignored")
    skips = data.Skips()
    ids = data.scan(str(tmp_path), min_size=32, skips=skips)
    assert [i.id for i in ids] == ["id00", "id01", "id02", "id03"]
    assert [len(i.paths) for i in ids] == [1, 1, 3, 3]
    assert skips.counts() == {"unreadable": 1, "too small": 1}
    assert "2 skipped" in skips.summary()


def test_empty_and_tiny_datasets_fail_at_once(tmp_path):
    with pytest.raises(HDBError, match="holds no images"):
        data.scan(str(tmp_path))
    from PIL import Image

    for k in range(3):
        Image.new("RGB", (8, 8), (k, 0, 0)).save(tmp_path / f"{k}.png")
    with pytest.raises(HDBError, match=r"None of the 3 images .* usable \(3 skipped \(3 too small\)\)"):
        data.scan(str(tmp_path), min_size=32)
    with pytest.raises(HDBError, match="does not exist"):
        data.scan(str(tmp_path / "nope"))


def test_face_check_skips_non_faces(tmp_path):
    from PIL import Image
    from skimage.data import astronaut

    Image.fromarray(astronaut()).save(tmp_path / "astronaut.png")
    make_faces(str(tmp_path / "shapes"), 1, size=(200, 200))
    skips = data.Skips()
    face = data.load_identity(data.Identity("a", (str(tmp_path / "astronaut.png"),)), 64, "crop", skips)
    shape = data.load_identity(data.Identity("s", (str(tmp_path / "shapes" / "id00.png"),)), 64, "detect", skips)
    assert face.shape == (1, 64, 64, 3) and shape is None
    assert skips.counts() == {"no face found": 1, "identity without usable images": 1}


# -- base model ---------------------------------------------------------------------------------
def test_base_model_errors_name_what_is_missing(tmp_path, tiny_model):
    from devtools.tiny_diffusers import copy_without

    with pytest.raises(HDBError, match="does not exist"):
        load_base_model(str(tmp_path / "missing"))
    broken = copy_without(tiny_model, str(tmp_path / "noconfig"), "unet/config.json")
    with pytest.raises(HDBError, match=r"has no unet/config.json"):
        load_base_model(broken)
    noweights = copy_without(tiny_model, str(tmp_path / "noweights"), "vae/diffusion_pytorch_model.safetensors")
    with pytest.raises(HDBError, match=r"no weights in vae/"):
        load_base_model(noweights)
    notok = copy_without(tiny_model, str(tmp_path / "notok"), "tokenizer/merges.txt")
    with pytest.raises(HDBError, match=r"tokenizer/vocab.json and tokenizer/merges.txt"):
        load_base_model(notok)
    single = tmp_path / "model.safetensors"
    single.write_bytes(b"x")
    with pytest.raises(HDBError, match="--base-config"):
        load_base_model(str(single))
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"x")
    with pytest.raises(HDBError, match="not a .safetensors"):
        load_base_model(str(ckpt))


# -- checkpoints --------------------------------------------------------------------------------
def test_checkpoint_round_trip_continues_adam_exactly(tmp_path):
    def make():
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(5, 3))
        return w, torch.optim.Adam([w], lr=0.1)

    def step(w, opt, k):
        opt.zero_grad()
        (w * torch.arange(15.).view(5, 3) * (k + 1)).sin().sum().backward()
        opt.step()

    w, opt = make()
    for k in range(3):
        step(w, opt, k)
    tensors, meta = optimizer_state(opt)
    tensors["w"] = w
    save_checkpoint(str(tmp_path / "c.safetensors"), tensors, {"step": 3, "optimizer": meta})
    for k in range(3, 5):
        step(w, opt, k)

    loaded, state = load_checkpoint(str(tmp_path / "c.safetensors"))
    w2, opt2 = make()
    with torch.no_grad():
        w2.copy_(loaded["w"])
    load_optimizer_state(opt2, loaded, state["optimizer"])
    for k in range(state["step"], 5):
        step(w2, opt2, k)
    assert torch.equal(w, w2)
    assert set(prefixed(loaded, "optim")) == {"0.step", "0.exp_avg", "0.exp_avg_sq"}
    assert load_checkpoint(str(tmp_path / "none.safetensors")) is None
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(HDBError, match="damaged"):
        load_checkpoint(str(tmp_path / "bad.safetensors"))
    assert [p for p in os.listdir(tmp_path) if p.startswith(".tmp")] == []
