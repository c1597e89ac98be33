"""HyperNetwork core: shapes on real target lists, refinement passes, learning, several photos, the file format."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from hdb_core.errors import HDBError
from hdb_core.lidb.file import save_lidb
from hdb_core.hypernet.model import HyperNetConfig, HyperNetwork
from hdb_core.hypernet.file import FORMAT_VERSION, load_hypernet, read_hypernet_metadata, save_hypernet
from hdb_core.hypernet.image_encoder import EncoderSpec
from hdb_core.lidb.weights import LiDB, LiDBConfig
from hdb_core.lidb.targets import LayerSpec
from hdb_core.lidb.batch import stack_train
from hdb_core.training.stage1 import weight_loss

SMALL = HyperNetConfig(width=32, depth=1, heads=2, iterations=3)
ENC = EncoderSpec(hidden_size=16, num_tokens=5, image_size=28, name="tiny encoder")
# A mixed list: narrow layers get smaller a_l/b_l and so a head group of their own.
TOY_LAYERS = (LayerSpec("unet.a.attn1.to_q", 32, 32), LayerSpec("unet.a.attn2.to_k", 24, 32),
              LayerSpec("unet.b.attn1.to_out.0", 128, 160), LayerSpec("te.l.0.self_attn.q_proj", 32, 32))

DEFAULT_LIDB_CONFIG = LiDBConfig()


def toy_net(seed=0, config=SMALL, layers=TOY_LAYERS, lidb_config=DEFAULT_LIDB_CONFIG) -> HyperNetwork:
    torch.manual_seed(seed)
    return HyperNetwork(config, layers, lidb_config, ENC)


def features(n=1, seed=0, spec=ENC):
    return torch.randn(n, spec.num_tokens, spec.hidden_size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def sd15():
    from devtools.arch_targets import sd15_targets
    return sd15_targets()


@pytest.fixture(scope="module")
def sdxl():
    from devtools.arch_targets import sdxl_targets
    return sdxl_targets()


def _check_lidb_covers(lidb: LiDB, layers, config: LiDBConfig):
    assert lidb.layers == tuple(layers)
    assert set(lidb.a_train) == {s.name for s in layers}
    for s in layers:
        a_l, b_l = config.layer_dims(s)
        assert lidb.a_train[s.name].shape == (a_l, config.rank)
        assert lidb.b_train[s.name].shape == (config.rank, b_l)
    assert lidb.is_finite() and lidb.info["source"] == "predicted"


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_predicts_every_target_layer_of_full_size_architectures(arch, request):
    layers = request.getfixturevalue(arch)
    assert len(layers) == {"sd15": 176, "sdxl": 736}[arch]
    cfg = LiDBConfig(rank=2)
    net = HyperNetwork(HyperNetConfig(width=16, depth=1, heads=2, iterations=2), layers, cfg, ENC)
    lidb = net.predict_lidb(features(1))
    _check_lidb_covers(lidb, layers, cfg)
    # The batched forward gives one prediction per photo, with the same layout.
    a, b = net(features(3))
    name = layers[-1].name
    assert a[name].shape == (3, 100, 2) and b[name].shape == (3, 2, 50)
    assert not torch.equal(a[name][0], a[name][1])


def test_head_groups_follow_layer_dims():
    net = toy_net()
    assert net.group_dims == {"32x32": (32, 32), "24x32": (24, 32), "100x50": (100, 50)}
    assert net.group_layers["32x32"] == (0, 3)  # non-contiguous members of one group
    lidb = net.predict_lidb(features())
    _check_lidb_covers(lidb, TOY_LAYERS, LiDBConfig())
    # Grouped and per-name outputs are the same numbers.
    grouped = net.heads_from(net.weight_features(features()))
    a, _ = net(features())
    assert torch.equal(grouped["32x32"][0][0, 1], a["te.l.0.self_attn.q_proj"][0])


def test_zero_passes_predict_exactly_zero_delta():
    net = toy_net()
    lidb = net.predict_lidb(features(), iterations=0)
    for s in TOY_LAYERS:
        assert torch.count_nonzero(lidb.a_train[s.name]) == 0 and torch.count_nonzero(lidb.b_train[s.name]) == 0
        assert torch.count_nonzero(lidb.delta(s.name)) == 0
    assert torch.count_nonzero(net.predict_lidb(features(), iterations=1).delta(TOY_LAYERS[0].name)) > 0


def test_each_pass_adds_a_delta_that_changes_the_prediction():
    net = toy_net().eval()
    f = features()
    with torch.no_grad():
        thetas = [net.weight_features(f, k) for k in range(5)]
        preds = [net.heads_from(net.weight_features(f, k)) for k in range(5)]
    for k in range(1, 5):
        step = thetas[k] - thetas[k - 1]
        assert step.abs().max() > 1e-4, f"pass {k} added nothing"
        for key in preds[k]:
            assert not torch.allclose(preds[k][key][0], preds[k - 1][key][0])
        # Heads are linear: the prediction moves by exactly the heads of the delta.
        moved = net.heads_from(step)
        for key in preds[k]:
            torch.testing.assert_close(preds[k][key][0] - preds[k - 1][key][0], moved[key][0], atol=1e-5, rtol=1e-4)
    # The config's iteration count is the default.
    with torch.no_grad():
        assert torch.equal(net.weight_features(f), thetas[SMALL.iterations])


def test_a_few_steps_on_a_toy_set_drive_the_weight_loss_down():
    torch.manual_seed(0)
    net = toy_net(seed=1)
    g = torch.Generator().manual_seed(2)
    images = features(6, seed=3)
    targets = [LiDB.zeros(TOY_LAYERS, LiDBConfig()).with_tensors(
        {s.name: torch.randn(*LiDBConfig().layer_dims(s)[:1], 1, generator=g) * 0.1 for s in TOY_LAYERS},
        {s.name: torch.randn(1, LiDBConfig().layer_dims(s)[1], generator=g) * 0.1 for s in TOY_LAYERS})
        for _ in range(6)]
    a_t, b_t = stack_train(targets)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)

    def loss_fn():
        a_hat, b_hat = net(images)
        return weight_loss(a_hat, b_hat, a_t, b_t, [s.name for s in TOY_LAYERS]).mean()

    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.grad is not None for p in net.parameters())
    assert losses[-1] < 0.2 * losses[0], losses[::5]
    # Better than the best image-blind answer (every target's mean), so it uses the photo.
    blind = sum(((a_t[n] - a_t[n].mean(0)) ** 2).sum() + ((b_t[n] - b_t[n].mean(0)) ** 2).sum()
                for n in a_t).item() / len(targets)
    assert losses[-1] < 0.5 * blind, (losses[-1], blind)


def test_several_photos_are_attended_together_order_free_and_duplicates_change_nothing():
    net = toy_net()
    one, other = features(1, seed=5), features(1, seed=6)
    both = net.predict_lidb(torch.cat([one, other]))
    swapped = net.predict_lidb(torch.cat([other, one]))
    single = net.predict_lidb(one)
    tripled = net.predict_lidb(one.expand(3, -1, -1))
    name = TOY_LAYERS[2].name
    torch.testing.assert_close(both.a_train[name], swapped.a_train[name], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(single.b_train[name], tripled.b_train[name], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(both.a_train[name], single.a_train[name], atol=1e-4)
    assert not torch.allclose(both.a_train[name], net.predict_lidb(other).a_train[name], atol=1e-4)


def test_inputs_are_not_mutated_and_bad_features_are_refused():
    net = toy_net()
    f = features(2)
    before = f.clone()
    net.predict_lidb(f)
    assert torch.equal(f, before)
    with pytest.raises(HDBError, match="hidden size|16"):
        net.predict_lidb(torch.randn(1, 5, 24))
    with pytest.raises(HDBError, match="empty"):
        net.predict_lidb(torch.randn(0, 5, 16))
    with pytest.raises(HDBError, match="iterations"):
        net.predict_lidb(f, iterations=-1)


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        HyperNetConfig(width=30, heads=4)
    with pytest.raises(ValueError, match="depth"):
        HyperNetConfig(depth=0)
    assert HyperNetConfig.from_dict(HyperNetConfig().to_dict()) == HyperNetConfig()


# -- file format -----------------------------------------------------------------------------------

def test_file_round_trip_keeps_predictions_config_and_signature(tmp_path):
    net = toy_net(config=HyperNetConfig(width=32, depth=2, heads=4, iterations=5),
                  lidb_config=LiDBConfig(a=20, b=10, rank=1, seed=7))
    net.base_model = "SD1.5"
    path = str(tmp_path / "hn.safetensors")
    save_hypernet(net, path, {"trigger": "sks", "steps": "100"})
    assert os.listdir(tmp_path) == ["hn.safetensors"]  # atomic: no temp file left behind
    loaded = load_hypernet(path)
    assert loaded.config == net.config and loaded.layers == net.layers and loaded.lidb_config == net.lidb_config
    assert loaded.encoder == ENC and loaded.base_model == "SD1.5" and loaded.info == {"trigger": "sks", "steps": "100"}
    f = features(2)
    p0, p1 = net.predict_lidb(f), loaded.predict_lidb(f)
    assert all(torch.equal(p0.a_train[k], p1.a_train[k]) and torch.equal(p0.b_train[k], p1.b_train[k])
               for k in p0.a_train)
    meta = read_hypernet_metadata(path)
    assert json.loads(meta["encoder"])["hidden_state"] == "penultimate"
    assert json.loads(meta["config"])["iterations"] == 5 and meta["seed"] == "7"


def _one_sentence(msg: str) -> bool:
    return "\n" not in msg and msg.rstrip().endswith(".") and len(msg) < 400


def test_bad_files_give_one_sentence_errors(tmp_path):
    net = toy_net()
    good = str(tmp_path / "good.safetensors")
    save_hypernet(net, good)
    tensors = load_file(good)
    from safetensors import safe_open
    with safe_open(good, "pt") as f:
        meta = f.metadata()

    def variant(name, t=None, **m):
        p = str(tmp_path / name)
        save_file(tensors if t is None else t, p, metadata={**meta, **m})
        return p

    lidb_path = str(tmp_path / "identity.safetensors")
    save_lidb(LiDB.zeros(TOY_LAYERS, LiDBConfig(), source="random"), lidb_path)
    plain = str(tmp_path / "plain.safetensors")
    save_file({"w": torch.zeros(2)}, plain)
    truncated = str(tmp_path / "cut.safetensors")
    with open(good, "rb") as f:
        data = f.read()
    with open(truncated, "wb") as f:
        f.write(data[: len(data) // 2])
    bad_shape = dict(tensors)
    bad_shape["layer_embed"] = torch.zeros(3, 32)
    nan = dict(tensors)
    nan["delta.weight"] = torch.full_like(tensors["delta.weight"], float("nan"))

    cases = {
        lidb_path: "is a LiDB",
        plain: "not a HyperDreamBooth hypernetwork",
        variant("newer.safetensors", format_version=str(FORMAT_VERSION + 1)): "newer than this pack",
        variant("oldaux.safetensors", aux_generator="hdb-aux-v0"): "aux-basis generator",
        variant("badmeta.safetensors", config="{not json"): "damaged hypernetwork metadata",
        variant("shape.safetensors", bad_shape): "do not match its own configuration",
        variant("nan.safetensors", nan): "NaN",
        truncated: "not a readable safetensors",
        str(tmp_path / "missing.safetensors"): "does not exist",
    }
    for path, expected in cases.items():
        with pytest.raises(HDBError) as e:
            load_hypernet(path)
        assert expected in str(e.value) and _one_sentence(str(e.value)), (path, str(e.value))


def test_save_refuses_nan_weights(tmp_path):
    net = toy_net()
    with torch.no_grad():
        net.layer_embed[0, 0] = float("inf")
    with pytest.raises(HDBError, match="NaN or Inf"):
        save_hypernet(net, str(tmp_path / "x.safetensors"))
    assert not os.listdir(tmp_path)


def test_a_hypernetwork_file_without_offsets_still_loads_and_predicts_as_before(tmp_path):
    """Files from before offsets existed: they load, with the zero offset they were trained with."""
    net = toy_net(seed=4)
    path = str(tmp_path / "new.safetensors")
    save_hypernet(net, path)
    tensors = load_file(path)
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    old = str(tmp_path / "old.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.startswith("offset_")}, old, metadata=header["__metadata__"])
    loaded = load_hypernet(old)
    f = features(seed=2)
    assert torch.equal(loaded.predict_lidb(f).delta(TOY_LAYERS[0].name), net.predict_lidb(f).delta(TOY_LAYERS[0].name))


def test_the_offset_is_what_zero_passes_predict_and_travels_in_the_file(tmp_path):
    net = toy_net(seed=5)
    g = torch.Generator().manual_seed(0)
    mean = LiDB.zeros(TOY_LAYERS, LiDBConfig())
    a = {k: torch.randn(v.shape, generator=g) for k, v in mean.a_train.items()}
    b = {k: torch.randn(v.shape, generator=g) for k, v in mean.b_train.items()}
    net.set_offset(a, b)
    path = str(tmp_path / "offset.safetensors")
    save_hypernet(net, path)
    for model in (net, load_hypernet(path)):
        lidb = model.predict_lidb(features(), iterations=0)
        assert all(torch.equal(lidb.a_train[n], a[n]) and torch.equal(lidb.b_train[n], b[n]) for n in a)
        near = model.predict_lidb(features())          # an untrained network stays near its offset
        assert all((near.a_train[n] - a[n]).abs().max() < 0.05 * a[n].abs().max() for n in a)


def _toy_subspace(k=3, seed=0):
    from hdb_core.lidb.subspace import IdentitySubspace

    g = torch.Generator().manual_seed(seed)
    zero = LiDB.zeros(TOY_LAYERS, LiDBConfig())
    lidbs = [LiDB(TOY_LAYERS, LiDBConfig(), {n: torch.randn(v.shape, generator=g) for n, v in zero.a_train.items()},
                  {n: torch.randn(v.shape, generator=g) for n, v in zero.b_train.items()}, {}) for _ in range(k + 2)]
    return IdentitySubspace.fit(lidbs, k)


def subspace_net(k=3, seed=0):
    from hdb_core.hypernet.subspace_model import SubspaceHyperNetwork, SubspaceNetConfig

    torch.manual_seed(seed)
    net = SubspaceHyperNetwork(SubspaceNetConfig(k), TOY_LAYERS, LiDBConfig(), ENC)
    net.set_subspace(_toy_subspace(k, seed))
    feats = features(8, seed=9)
    net.set_feature_statistics(feats.mean(0), feats.std(0))
    return net


def test_the_subspace_hypernetwork_predicts_in_its_subspace_from_its_mean(tmp_path):
    from hdb_core.hypernet.subspace_model import SubspaceHyperNetwork
    from hdb_core.lidb.subspace import rows_of

    net = subspace_net()
    untrained = rows_of([net.predict_lidb(features(seed=1))])[0]
    assert torch.equal(untrained, net.subspace_mean), "zero weights: the mean stage-0 LiDB"
    with torch.no_grad():
        net.coordinates.weight.normal_(0, 0.1)
    row = rows_of([net.predict_lidb(features(seed=1))])[0]
    offset = row - net.subspace_mean
    basis = net.subspace_directions / net.subspace_directions.norm(dim=1, keepdim=True)
    assert offset.norm() > 0.1 and (offset - basis.T @ (basis @ offset)).norm() < 1e-4 * offset.norm()
    path = str(tmp_path / "sub.safetensors")
    save_hypernet(net, path)
    meta = read_hypernet_metadata(path)
    assert meta["format_version"] == "2" and json.loads(meta["config"]) == {"kind": "subspace_linear", "components": 3}
    loaded = load_hypernet(path)
    assert isinstance(loaded, SubspaceHyperNetwork) and loaded.encoder == ENC
    assert torch.equal(rows_of([loaded.predict_lidb(features(seed=1))])[0], row)


def test_the_subspace_hypernetwork_averages_several_photos_and_refuses_other_encoders():
    from hdb_core.lidb.subspace import rows_of

    net = subspace_net(seed=2)
    with torch.no_grad():
        net.coordinates.weight.normal_(0, 0.1)
    a, b = features(1, seed=3), features(1, seed=4)
    row = lambda f: rows_of([net.predict_lidb(f)])[0]                       # noqa: E731
    both = row(torch.cat([a, b]))
    assert torch.allclose(both, (row(a) + row(b)) / 2, atol=1e-5)
    assert torch.allclose(both, row(torch.cat([b, a])), atol=1e-6) and torch.allclose(row(torch.cat([a, a])), row(a))
    with pytest.raises(HDBError, match="image tokens per photo"):
        net.predict_lidb(torch.randn(1, ENC.num_tokens + 1, ENC.hidden_size))
    with pytest.raises(HDBError, match="expects image features"):
        net.predict_lidb(torch.randn(1, ENC.num_tokens, ENC.hidden_size + 1))
    with pytest.raises(HDBError, match="directions but the hypernetwork"):
        net.set_subspace(_toy_subspace(2))
