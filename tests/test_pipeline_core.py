"""Training-pipeline building blocks on real diffusers/transformers models: per-sample LiDB injection,
dataset scanning, offline base-model loading, checkpoints."""
from __future__ import annotations

import os

import pytest
import torch

from hdb_core import data
from hdb_core.base_model import load_base_model
from hdb_core.checkpoint import (load_checkpoint, load_optimizer_state, optimizer_state, prefixed,
                                 save_checkpoint)
from hdb_core.diffusers_lidb import LiDBInjector, stack_train
from hdb_core.errors import HDBError
from hdb_core.lidb import LiDB, LiDBConfig

from tests.pipeline_fixtures import base, make_faces, tiny_model  # noqa: F401  (fixtures)


def random_lidbs(layers, n, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lidb = LiDB.zeros(layers, LiDBConfig())
        a = {k: torch.randn(v.shape, generator=g) * scale for k, v in lidb.a_train.items()}
        b = {k: torch.randn(v.shape, generator=g) * scale for k, v in lidb.b_train.items()}
        out.append(lidb.with_tensors(a, b))
    return out


def unet_inputs(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 8, 8, generator=g), torch.tensor([10, 500, 900, 250][:batch]),
            torch.randn(batch, 77, 32, generator=g))


def test_batched_residuals_equal_each_sample_alone(base):
    layers = base.layers(text_encoder=False)
    lidbs = random_lidbs(layers, 3)
    x, t, ctx = unet_inputs(3)
    with torch.no_grad(), LiDBInjector(base.modules(False), layers, LiDBConfig()) as inj:
        inj.set_lidb(lidbs)
        batched = base.unet(x, t, ctx).sample
        alone = []
        for i in range(3):
            inj.set_lidb(lidbs[i])
            alone.append(base.unet(x[i:i + 1], t[i:i + 1], ctx[i:i + 1]).sample)
        inj.clear()
        plain = base.unet(x, t, ctx).sample
    alone = torch.cat(alone)
    assert torch.allclose(batched, alone, atol=1e-5, rtol=1e-4)
    assert (batched - plain).abs().max() > 1e-3  # the residuals really change the output


def test_residual_matches_a_merged_weight(base):
    """x @ (W + up @ down)^T: the wrapper adds exactly the LiDB's dW, text encoder included."""
    layers = base.layers()
    (lidb,) = random_lidbs(layers, 1, seed=3)
    ids = base.tokenizer(["a sks face"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        with LiDBInjector(base.modules(), layers, LiDBConfig()) as inj:
            inj.set_lidb(lidb)
            wrapped = base.text_encoder(ids)[0]
        saved = {}
        for path, lin in base.text_encoder.named_modules():
            name = f"te.{path}"
            if name in lidb.spec_by_name:
                saved[path] = lin.weight.clone()
                lin.weight += lidb.delta(name)
        try:
            merged = base.text_encoder(ids)[0]
        finally:
            for path, lin in base.text_encoder.named_modules():
                if path in saved:
                    lin.weight.copy_(saved[path])
    assert torch.allclose(wrapped, merged, atol=1e-5, rtol=1e-4)


def test_one_lidb_broadcasts_and_tiles_over_cfg_batches(base):
    layers = base.layers(text_encoder=False)
    lidbs = random_lidbs(layers, 2, seed=1)
    x, t, ctx = unet_inputs(4)
    with torch.no_grad(), LiDBInjector(base.modules(False), layers, LiDBConfig()) as inj:
        inj.set_lidb(lidbs[0])
        one = base.unet(x, t, ctx).sample
        inj.set_lidb([lidbs[0]] * 4)
        four = base.unet(x, t, ctx).sample
        inj.set_lidb(lidbs)                      # [uncond a, uncond b, cond a, cond b]
        tiled = base.unet(x, t, ctx).sample
        inj.set_lidb(lidbs + lidbs)
        explicit = base.unet(x, t, ctx).sample
        inj.set_lidb(random_lidbs(layers, 3))
        with pytest.raises(HDBError, match="cannot use 3 per-sample LiDBs"):
            base.unet(x, t, ctx)
    assert torch.allclose(one, four, atol=1e-6) and torch.allclose(tiled, explicit, atol=1e-6)


def test_wrapping_leaves_the_model_untouched_and_gradients_reach_the_train_matrices(base, hash_weights):
    layers = base.layers()
    before = hash_weights(base.unet), hash_weights(base.text_encoder)
    a, b = stack_train(random_lidbs(layers, 2))
    a = {k: v.requires_grad_(True) for k, v in a.items()}
    b = {k: v.requires_grad_(True) for k, v in b.items()}
    x, t, _ = unet_inputs(2)
    ids = base.tokenizer(["a sks face"] * 2, padding="max_length", max_length=77, return_tensors="pt").input_ids
    inj = LiDBInjector(base.modules(), layers, LiDBConfig())
    with inj:
        inj.set_train(a, b)
        out = base.unet(x, t, base.text_encoder(ids)[0]).sample
        out.pow(2).mean().backward()
    assert all("forward" not in vars(m) for m in base.unet.modules())  # wrappers removed
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in (*a.values(), *b.values()))
    assert (hash_weights(base.unet), hash_weights(base.text_encoder)) == before
    assert not any(p.requires_grad for p in base.unet.parameters())


def test_injector_refuses_lidbs_of_another_model(base):
    other = [s for s in base.layers()][:-1] + [type(base.layers()[0])("unet.mid_block.nothing.to_q", 32, 32)]
    with pytest.raises(HDBError, match="base model"):
        LiDBInjector(base.modules(), other, LiDBConfig())


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
