"""Stage 1 (`hdb train-hypernet`) and the personalisation commands: the loss falls, the hypernet file
works with `hdb predict` / `hdb finetune` / `hdb export-lora`, and bad input fails before training."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open

from hdb_core import cli, defaults
from hdb_core.lidb.file import load_lidb, save_lidb
from hdb_core.hypernet.file import load_hypernet
from hdb_core.hypernet.image_encoder import ClipImageEncoder
from hdb_core.lidb.weights import LiDB, LiDBConfig
from hdb_core.training.stage0 import PreoptimizeSettings, preoptimize
from hdb_core.training.prepared import PreparedData, PrepareSettings, prepare
from hdb_core.training.stage1 import (HypernetSettings, Objective, Samples, check_targets, new_hypernet,
                                      train_hypernet)

from tests.pipeline_fixtures import FAST, FAST_NET, make_faces


@pytest.fixture(scope="module")
def stage0(tmp_path_factory, base, tiny_model):
    """(prepared folder, stage-0 LiDB folder, faces folder) for 4 synthetic identities."""
    root = tmp_path_factory.mktemp("stage0")
    faces = make_faces(str(root / "faces"), 4)
    encoder = ClipImageEncoder.from_pretrained(os.path.join(tiny_model, "image_encoder"))
    prepare(faces, base, encoder, str(root / "prepared"), PrepareSettings(resolution=64, face_check="none",
                                                                           min_size=32), progress=False)
    preoptimize(str(root / "prepared"), base, str(root / "lidbs"), PreoptimizeSettings(
        steps=4, batch_size=4, learning_rate=1e-2), progress=False)
    return str(root / "prepared"), str(root / "lidbs"), faces


def objective_parts(prepared_dir, lidbs, base, settings):
    """(untrained net, Samples over every identity, Objective) as train_hypernet builds them."""
    prepared = PreparedData(prepared_dir)
    layers, config, mean, _ = check_targets(prepared.ids, lidbs, base)
    net = new_hypernet(settings, layers, config, prepared.encoder, "model")
    samples = Samples(prepared, prepared.ids, lidbs, settings, 1, base.num_timesteps, (4, 8, 8))
    return net, samples, Objective(layers, config, base, settings, "cpu", torch.float32, mean)


def net_settings(**kw) -> HypernetSettings:
    return HypernetSettings(**{**dict(steps=25, batch_size=2, resolution=64, face_check="none", min_size=32,
                                      width=32, heads=2, depth=1, iterations=2, warmup_steps=2, learning_rate=3e-3,
                                      checkpoint_every=100), **kw})


@pytest.mark.parametrize("weight_length", ["joint", "separate"])
def test_stage1_loss_falls(stage0, base, tiny_model, tmp_path, weight_length):
    prepared, lidbs, _ = stage0
    settings = net_settings(weight_length=weight_length)
    out = str(tmp_path / "hn.safetensors")
    log = []
    train_hypernet(prepared, lidbs, base, None, out, settings, progress=False, on_step=log.append)

    # The same objective, on the same fixed draws (steps 0..3 of the schedule), before and after training.
    start, samples, objective = objective_parts(prepared, lidbs, base, settings)
    trained = load_hypernet(out)
    with torch.no_grad(), objective:
        before = [objective.terms(start, samples.batch(k)) for k in range(4)]
        after = [objective.terms(trained, samples.batch(k)) for k in range(4)]
        total = lambda runs: sum(float(objective.value(r)) for r in runs)   # noqa: E731
    weight = lambda runs: sum(float(r.weight.mean()) for r in runs)        # noqa: E731
    assert total(after) < total(before)
    assert weight(after) < 0.5 * weight(before)
    assert [e["step"] for e in log] == list(range(1, 26))
    rows = open(tmp_path / "hn.state" / "loss.csv").read().splitlines()
    assert rows[0] == "step,loss,diffusion,weight,lr,weight_to_diffusion_grad" and len(rows) == 26
    assert all(float(r.split(",")[-1]) > 0 for r in rows[1:]), "the raw gradient ratio is logged every step"


def test_weight_and_diffusion_gradients_are_balanced_at_the_default_beta(stage0, base, tiny_model):
    """At the predicted weights the weight term's gradient is beta (default 1) times the diffusion term's,
    and the network receives exactly the gradient of alpha * diffusion + scale * weight."""
    prepared, lidbs, _ = stage0
    settings = net_settings()
    assert HypernetSettings().beta == settings.beta == 1.0
    net, samples, objective = objective_parts(prepared, lidbs, base, settings)
    with objective:
        norms = objective.backward(objective.terms(net, samples.batch(0)))
        balanced = [p.grad.clone() for p in net.parameters()]
        net.zero_grad()
        terms = objective.terms(net, samples.batch(0))
        scale = norms["weight_grad"] / (norms["raw_ratio"] * norms["diffusion_grad"])
        (settings.alpha * terms.diffusion.mean() + scale * terms.weight.mean()).backward()
    assert 0.1 < norms["weight_grad"] / norms["diffusion_grad"] < 10
    torch.testing.assert_close(norms["weight_grad"], norms["diffusion_grad"], rtol=1e-4, atol=0)
    assert norms["raw_ratio"] > 10, "unbalanced, the summed weight term would dominate (why balancing exists)"
    for mine, reference in zip(balanced, (p.grad for p in net.parameters())):
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("space", ["factors", "delta"])
def test_the_grouped_factor_build_gives_stage1_the_same_terms_and_gradients(stage0, base, space):
    """Off the CPU the objective builds its factors per group of same-shaped layers (`LayerFactors`),
    forced here on the CPU: the same losses and network gradients to rounding, in both weight spaces
    (the delta space builds the stage-0 targets' factors too)."""
    from hdb_core.lidb.batch import LayerFactors

    prepared, lidbs, _ = stage0
    layers, config, _, _ = check_targets(PreparedData(prepared).ids, lidbs, base)
    net, samples, objective = objective_parts(prepared, lidbs, base, net_settings(weight_space=space))
    batch = samples.batch(0)

    def terms_and_grads():
        net.zero_grad()
        terms = objective.terms(net, batch)
        objective.value(terms).backward()
        return terms, [p.grad.clone() for p in net.parameters() if p.grad is not None]

    with objective:
        assert not objective.factors.grouped        # the CPU's default
        plain, grads = terms_and_grads()
        objective.factors = LayerFactors(config, layers, "cpu", grouped=True)
        grouped, grouped_grads = terms_and_grads()
    torch.testing.assert_close(grouped.diffusion, plain.diffusion, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grouped.weight, plain.weight, rtol=1e-5, atol=1e-7)
    assert len(grads) == len(grouped_grads) > 0
    for a, b in zip(grouped_grads, grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_delta_weight_term_is_the_dw_distance_and_blind_to_the_factors_gauge():
    """--weight-space delta: sum over layers of ||dW_hat - dW||_F^2, computed without forming dW, and the
    same when a rank-1 update is split differently between its factors (A c, B / c)."""
    from hdb_core.lidb.batch import LayerFactors
    from hdb_core.lidb.targets import LayerSpec
    from hdb_core.training.stage1 import delta_weight_loss, weight_loss

    layers = (LayerSpec("unet.x.to_q", 24, 16), LayerSpec("unet.x.to_out.0", 16, 24))
    config = LiDBConfig(a=8, b=6, rank=1)
    factors = LayerFactors(config, layers, "cpu")
    names = [s.name for s in layers]
    g = torch.Generator().manual_seed(0)
    a_hat = {n: torch.randn(3, 8, 1, generator=g) for n in names}
    b_hat = {n: torch.randn(3, 1, 6, generator=g) for n in names}
    a_t = {n: torch.randn(3, 8, 1, generator=g) for n in names}
    b_t = {n: torch.randn(3, 1, 6, generator=g) for n in names}
    hat, target = factors.named(a_hat, b_hat), factors.named(a_t, b_t)
    got = delta_weight_loss(hat, target, names)
    want = sum((hat[n][1] @ hat[n][0] - target[n][1] @ target[n][0]).pow(2).sum((1, 2)) for n in names)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    regauged_a = {n: 3.0 * v for n, v in a_t.items()}
    regauged_b = {n: v / 3.0 for n, v in b_t.items()}
    torch.testing.assert_close(delta_weight_loss(hat, factors.named(regauged_a, regauged_b), names), got,
                               rtol=1e-4, atol=1e-5)
    assert not torch.allclose(weight_loss(a_hat, b_hat, regauged_a, regauged_b, names),
                              weight_loss(a_hat, b_hat, a_t, b_t, names))
    with pytest.raises(Exception, match="weight space must be one of factors, delta"):
        HypernetSettings(weight_space="dw").validate()


def test_separate_weight_length_keeps_the_loss_and_stops_the_shrinking():
    """--weight-length separate: the factor L2's value, but where the direction is off, plain L2 shortens the
    offset from the mean while this pulls it to the target's length only."""
    from hdb_core.training.stage1 import unshrunk_weight_loss, weight_loss

    names = ["unet.x.to_q", "unet.x.to_v"]
    g = torch.Generator().manual_seed(0)
    mean = ({n: torch.randn(8, 1, generator=g) for n in names}, {n: torch.randn(1, 6, generator=g) for n in names})

    def lidb(offset):
        """Factors at the mean + a flat offset [3, 28] (per layer: A's 8 numbers, then B's 6)."""
        parts = offset.view(3, 2, 14)
        return ({n: mean[0][n] + parts[:, i, :8].reshape(3, 8, 1) for i, n in enumerate(names)},
                {n: mean[1][n] + parts[:, i, 8:].reshape(3, 1, 6) for i, n in enumerate(names)})

    o_t = torch.randn(3, 28, generator=g)
    side = torch.randn(3, 28, generator=g)
    side = side - (side * o_t).sum(1, keepdim=True) / o_t.pow(2).sum(1, keepdim=True) * o_t
    side = side / side.norm(dim=1, keepdim=True) * o_t.norm(dim=1, keepdim=True)
    misdirected = 0.5 * o_t + 0.75 ** 0.5 * side        # the target's length, 60 degrees off (cos 0.5)
    target = lidb(o_t)
    for offset in (o_t, misdirected, 0.3 * misdirected):
        torch.testing.assert_close(unshrunk_weight_loss(*lidb(offset), *target, mean, names),
                                   weight_loss(*lidb(offset), *target, names), rtol=1e-5, atol=1e-5)

    def grad_of_length(loss, factor):
        """d loss / d (the offset's length factor) at `factor`."""
        s = torch.full((3, 1), factor, requires_grad=True)
        return torch.autograd.grad(loss(*lidb(s * misdirected)).sum(), s)[0].flatten()

    plain = lambda a, b: weight_loss(a, b, *target, names)                   # noqa: E731
    mine = lambda a, b: unshrunk_weight_loss(a, b, *target, mean, names)     # noqa: E731
    assert (grad_of_length(plain, 1.0) > 0).all(), "plain L2 shortens a misdirected prediction"
    torch.testing.assert_close(grad_of_length(mine, 1.0), torch.zeros(3), atol=1e-4, rtol=0)
    assert (grad_of_length(mine, 0.5) < 0).all() and (grad_of_length(mine, 1.5) > 0).all()
    with pytest.raises(Exception, match="weight length must be one of joint, separate"):
        HypernetSettings(weight_length="both").validate()
    with pytest.raises(Exception, match="use it with weight space 'factors'"):
        HypernetSettings(weight_length="separate", weight_space="delta").validate()


def test_loader_workers_give_the_same_network(stage0, base, tmp_path):
    """Samples are a function of (seed, position) only: worker processes change nothing."""
    from safetensors.torch import load_file

    prepared, lidbs, _ = stage0
    outs = []
    for workers in (0, 2):
        outs.append(str(tmp_path / f"hn{workers}.safetensors"))
        train_hypernet(prepared, lidbs, base, None, outs[-1], net_settings(steps=3, workers=workers), progress=False)
    a, b = load_file(outs[0]), load_file(outs[1])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_checkpointing_is_exact_and_bf16_autocast_runs_on_the_cpu(stage0, base):
    from hdb_core.training.runtime import autocast

    prepared, lidbs, _ = stage0
    net, samples, objective = objective_parts(prepared, lidbs, base, net_settings())
    batch = samples.batch(0)

    def loss_and_grads(checkpointing: bool, cast: str):
        net.zero_grad()
        with base.checkpointing(checkpointing), autocast(cast, torch.device("cpu")):
            terms = objective.terms(net, batch)
            objective.value(terms).backward()
        return terms.diffusion.detach(), [p.grad.clone() for p in net.parameters()]

    with objective:
        loss, grads = loss_and_grads(False, "off")
        loss_ckpt, grads_ckpt = loss_and_grads(True, "off")
        loss_bf16, grads_bf16 = loss_and_grads(False, "bf16")
    torch.testing.assert_close(loss_ckpt, loss)
    for a, b in zip(grads_ckpt, grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert torch.isfinite(loss_bf16).all() and all(torch.isfinite(g).all() for g in grads_bf16)
    assert not torch.equal(loss_bf16, loss), "autocast did not run the UNet in bf16"
    torch.testing.assert_close(loss_bf16, loss, rtol=5e-2, atol=1e-3)


def test_the_prior_term_joins_the_diffusion_term_and_checkpointing_stays_exact(stage0, base):
    """With a prior weight the diffusion term is the plain one plus weight x each sample's prior term (its
    own predicted LiDB against the bare model, for the class prompt); the balanced backward is unchanged
    by gradient checkpointing, which reruns the UNet with the residuals the term leaves set."""
    from hdb_core.errors import HDBError
    from hdb_core.training.base_model import tokenize
    from hdb_core.training.objective import PriorTerm

    prepared, lidbs, _ = stage0
    net, samples, plain = objective_parts(prepared, lidbs, base, net_settings(prior_weight=0.0))
    _, _, held = objective_parts(prepared, lidbs, base, net_settings(prior_weight=0.5, class_prompt="a face"))
    batch = samples.batch(0)
    with plain, torch.no_grad():
        a_hat, b_hat = net(batch["features"])
        prior = PriorTerm(base, plain.injector, tokenize(base, ["a face"], "cpu"), per_sample=True)(
            plain.factors.named(a_hat, b_hat), batch["latents"], batch["noise"], batch["timestep"])
        without = plain.terms(net, batch)
    assert prior.shape == without.diffusion.shape and (prior > 0).all()

    def balanced_grads(checkpointing: bool):
        net.zero_grad()
        with base.checkpointing(checkpointing):
            terms = held.terms(net, batch)
            held.backward(terms)
        return terms.diffusion.detach(), [p.grad.clone() for p in net.parameters()]

    with held:
        with_prior, grads = balanced_grads(False)
        with_prior_ckpt, grads_ckpt = balanced_grads(True)
    torch.testing.assert_close(with_prior, without.diffusion + 0.5 * prior, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(with_prior_ckpt, with_prior)
    for a, b in zip(grads_ckpt, grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    # on by default, so with alpha 0 (no diffusion term for it to join) it is simply not run
    no_diffusion = net_settings(prior_weight=1.0, alpha=0.0)
    no_diffusion.validate()
    assert objective_parts(prepared, lidbs, base, no_diffusion)[2].prior is None
    assert held.prior is not None and net_settings().prior_weight == defaults.STAGE_PRIOR_WEIGHT > 0
    with pytest.raises(HDBError, match="class_prompt is empty"):
        net_settings(class_prompt=" ").validate()


def test_an_identity_whose_first_photo_has_no_face_trains_on_its_others(base, tiny_model, tmp_path):
    """A photo that passes the header scan but fails the face check is skipped up front and counted."""
    from PIL import Image
    from skimage import data as skdata

    face = Image.fromarray(skdata.astronaut()).resize((256, 256))
    faces = tmp_path / "faces"
    for ident, photos in {"id00": {"a_wall.png": Image.new("RGB", (256, 256), (120, 130, 140)), "b.png": face},
                          "id01": {"a.png": face.transpose(Image.FLIP_LEFT_RIGHT)},
                          "id02": {"a.png": face.rotate(3)}}.items():
        (faces / ident).mkdir(parents=True)
        for name, image in photos.items():
            image.save(faces / ident / name)
    lidbs = str(tmp_path / "lidbs")
    preoptimize(str(faces), base, lidbs, PreoptimizeSettings(steps=2, batch_size=3, resolution=64,
                                                             face_check="detect", min_size=32), progress=False)
    encoder = ClipImageEncoder.from_pretrained(os.path.join(tiny_model, "image_encoder"))
    summary = train_hypernet(str(faces), lidbs, base, encoder, str(tmp_path / "hn.safetensors"),
                             net_settings(steps=3, face_check="detect"), progress=False)
    assert summary["identities"] == 3 and "1 skipped (1 no face found)" in summary["skipped"]
    prepared = PreparedData(str(tmp_path / "hn.state" / "prepared"))       # the face folder was prepared first
    assert {i: prepared.num_photos(i) for i in prepared.ids} == {"id00": 1, "id01": 1, "id02": 1}
    assert prepared.skip_counts == {"no face found": 1}


@pytest.fixture(scope="module")
def photo_sets(tmp_path_factory, base, tiny_model):
    """(prepared folder, stage-0 LiDB folder): two identities with 3 photos each and one with a single photo."""
    root = tmp_path_factory.mktemp("photo_sets")
    faces = make_faces(str(root / "faces"), 2, per_folder=3)
    make_faces(faces, 1, start=2, per_folder=1)
    encoder = ClipImageEncoder.from_pretrained(os.path.join(tiny_model, "image_encoder"))
    prepare(faces, base, encoder, str(root / "prepared"), PrepareSettings(resolution=64, face_check="none",
                                                                           min_size=32), progress=False)
    preoptimize(str(root / "prepared"), base, str(root / "lidbs"), PreoptimizeSettings(
        steps=1, batch_size=3, learning_rate=1e-2), progress=False)
    return str(root / "prepared"), str(root / "lidbs")


def test_the_diffusion_term_can_reconstruct_another_photo_of_the_person(photo_sets, base):
    """diffusion_photo="other": the latents come from another photo than the features, the other draws are
    unchanged, and an identity with one photo reconstructs its own."""
    prepared_dir, lidbs = photo_sets
    prepared = PreparedData(prepared_dir)

    def photo_of(ident, sample, tensor):
        found = [k for k in range(prepared.num_photos(ident)) for m in (0, 1)
                 if torch.equal(sample[tensor], prepared.features(ident, k, bool(m)) if tensor == "features"
                                else prepared.latents(ident, k)[m])]
        return found[0]

    runs = {mode: Samples(prepared, prepared.ids, lidbs, net_settings(diffusion_photo=mode),
                          1, base.num_timesteps, (4, 8, 8)) for mode in ("input", "other")}
    for pos in range(12):
        same, other = runs["input"][pos], runs["other"][pos]
        ident = runs["input"].identity(pos)
        for key in ("features", "noise", "timestep"):
            assert torch.equal(torch.as_tensor(same[key]), torch.as_tensor(other[key]))
        assert photo_of(ident, same, "latents") == photo_of(ident, same, "features")
        many = prepared.num_photos(ident) > 1
        assert (photo_of(ident, other, "latents") != photo_of(ident, other, "features")) == many
    with pytest.raises(Exception, match="diffusion photo must be one of input, other"):
        net_settings(diffusion_photo="same").validate()


def test_the_network_can_see_several_photos_of_the_person_at_once(photo_sets, base, tmp_path):
    """input_photos=3: every sample of a step shows the same number of photos (1 to 3, drawn per step), the
    first is the photo the diffusion term uses, the rest are the person's other photos (repeated when there
    are too few); input_photos=1 gives exactly the one-photo samples; a short run trains."""
    prepared_dir, lidbs = photo_sets
    prepared = PreparedData(prepared_dir)
    one, many = (Samples(prepared, prepared.ids, lidbs, net_settings(batch_size=3, input_photos=k), 1,
                         base.num_timesteps, (4, 8, 8)) for k in (1, 3))
    tokens = prepared.features(prepared.ids[0], 0, False).shape[0]
    counts = set()
    for step in range(8):
        batch = many.batch(step)
        count = batch["features"].shape[1] // tokens
        counts.add(count)
        assert batch["features"].shape[1] == count * tokens and 1 <= count <= 3
        for pos in many.positions(step):
            ident, sample, single = many.identity(pos), many[pos], one[pos]
            assert torch.equal(sample["latents"], single["latents"]) and torch.equal(sample["noise"], single["noise"])
            assert torch.equal(sample["features"][:tokens], single["features"])
            shown = {k for k in range(prepared.num_photos(ident)) for m in (0, 1)
                     for chunk in sample["features"].split(tokens)
                     if torch.equal(chunk, prepared.features(ident, k, bool(m)))}
            assert len(shown) == min(count, prepared.num_photos(ident))
    assert len(counts) > 1
    log = []
    train_hypernet(prepared_dir, lidbs, base, None, str(tmp_path / "hn.safetensors"),
                   net_settings(steps=4, input_photos=3, ema_decay=0, val_identities=0), progress=False,
                   on_step=log.append)
    assert len(log) == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    with pytest.raises(Exception, match="input photos is 0"):
        net_settings(input_photos=0).validate()


@pytest.fixture(scope="module")
def hypernet_file(stage0, tiny_model, tmp_path_factory):
    prepared, lidbs, _ = stage0
    out = str(tmp_path_factory.mktemp("hn") / "hn.safetensors")
    rc = cli.main(["train-hypernet", "--data", prepared, "--lidbs", lidbs, "--base-model", tiny_model,
                   "--output", out, "--steps", "3", "--batch-size", "2", "--lr", "1e-3", *FAST, *FAST_NET])
    assert rc == 0
    return out


def test_train_hypernet_cli_writes_file_log_and_plot(hypernet_file, stage0):
    net = load_hypernet(hypernet_file)
    lidb = load_lidb(os.path.join(stage0[1], "id00.safetensors"))
    assert net.layers == lidb.layers and net.lidb_config == lidb.config
    assert net.info["trigger"] == defaults.TRIGGER and net.info["identities"] == "4" and net.base_model == "model"
    state = hypernet_file[: -len(".safetensors")] + ".state"
    assert os.path.getsize(os.path.join(state, "loss.png")) > 1000
    assert len(open(os.path.join(state, "loss.csv")).read().splitlines()) == 4


def test_predict_finetune_export_from_the_command_line(hypernet_file, stage0, tiny_model, tmp_path, capsys):
    faces = stage0[2]
    enc = os.path.join(tiny_model, "image_encoder")
    photo = os.path.join(faces, "id01.png")
    assert cli.main(["predict", "--hypernet", hypernet_file, "--image-encoder", enc, "--image", photo,
                     "--output", str(tmp_path / "p.safetensors"), "--lora", str(tmp_path / "p_lora.safetensors"),
                     "--face-check", "none"]) == 0
    predicted = load_lidb(str(tmp_path / "p.safetensors"))
    assert predicted.info["source"] == "predicted" and predicted.config.rank == 1
    assert any(predicted.b_train[s.name].abs().sum() > 0 for s in predicted.layers)
    with safe_open(str(tmp_path / "p_lora.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in keys

    assert cli.main(["finetune", "--base-model", tiny_model, "--image", photo,
                     "--init", str(tmp_path / "p.safetensors"),
                     "--output", str(tmp_path / "f.safetensors"), "--steps", "2", "--resolution", "64",
                     "--face-check", "none", "--no-progress"]) == 0
    tuned = load_lidb(str(tmp_path / "f.safetensors"))
    assert tuned.info["source"] == "finetuned" and tuned.config.rank == 4
    name = tuned.layers[0].name
    assert not torch.allclose(tuned.delta(name), predicted.delta(name))

    assert cli.main(["export-lora", "--lidb", str(tmp_path / "f.safetensors"),
                     "--output", str(tmp_path / "f_lora.safetensors")]) == 0
    with safe_open(str(tmp_path / "f_lora.safetensors"), "pt") as f:
        down = f.get_tensor(f"lora_unet_{name[5:].replace('.', '_')}.lora_down.weight")
    assert down.dtype == torch.float16 and down.shape[0] == 4

    rc = cli.main(["predict", "--hypernet", hypernet_file, "--image-encoder", str(tmp_path / "nope"),
                   "--image", photo, "--output", str(tmp_path / "x.safetensors")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_stage1_bad_inputs_fail_before_training(stage0, base, tiny_model, tmp_path, capsys):
    prepared, lidbs, faces = stage0
    common = ["train-hypernet", "--data", faces, "--base-model", tiny_model, "--steps", "1", *FAST, *FAST_NET]

    other = tmp_path / "other"
    os.makedirs(other)
    from hdb_core.lidb.targets import LayerSpec

    wider = [LayerSpec(s.name, 64 if s.name.endswith(("attn2.to_k", "attn2.to_v")) else s.in_features, s.out_features)
             for s in base.layers()]
    save_lidb(LiDB.zeros(wider, LiDBConfig()), str(other / "id00.safetensors"))
    out = tmp_path / "hn.safetensors"
    rc = cli.main([*common, "--lidbs", str(other), "--output", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "stage-0 LiDBs" in err[-1] and "was made for" in err[-1] and "base model is" in err[-1]

    os.makedirs(tmp_path / "none")
    rc = cli.main([*common, "--lidbs", str(tmp_path / "none"), "--output", str(out)])
    assert rc == 2 and "has a stage-0 LiDB" in capsys.readouterr().err

    rc = cli.main([*common, "--lidbs", lidbs, "--output", str(out), "--image-encoder", str(tmp_path / "nope")])
    assert rc == 2 and "Image encoder" in capsys.readouterr().err
    other_encoder = tmp_path / "other_encoder"                  # prepared data: a given encoder must match
    os.makedirs(other_encoder)
    config = ClipImageEncoder.from_pretrained(os.path.join(tiny_model, "image_encoder")).model.config
    config.hidden_size *= 2
    config.save_pretrained(str(other_encoder))
    rc = cli.main([*common[:2], prepared, *common[3:], "--lidbs", lidbs, "--output", str(out),
                   "--image-encoder", str(other_encoder)])
    assert rc == 2 and "holds features of" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "hn.state").exists()


def test_resume_with_other_settings_is_refused(stage0, base, tiny_model, tmp_path):
    _, lidbs, faces = stage0
    encoder = ClipImageEncoder.from_pretrained(os.path.join(tiny_model, "image_encoder"))
    out = str(tmp_path / "hn.safetensors")

    class Stop(Exception):
        pass

    def stop(info):
        if info["step"] == 2:
            raise Stop()
    with pytest.raises(Stop):
        train_hypernet(faces, lidbs, base, encoder, out, net_settings(steps=4, checkpoint_every=1), progress=False,
                       on_step=stop)
    from hdb_core.errors import HDBError

    with pytest.raises(HDBError, match=r"other settings \(learning_rate: 0.003 there, 0.01 now\)"):
        train_hypernet(faces, lidbs, base, encoder, out, net_settings(steps=4, learning_rate=1e-2), progress=False)

    # a checkpoint written before a setting existed resumes with the value it trained with: `diffusion_photo`'s
    # default, and the prior term off (it became stage 1's default later)
    from hdb_core.training.checkpoint import load_checkpoint, save_checkpoint

    ckpt = str(tmp_path / "hn.state" / "checkpoint.safetensors")
    tensors, state = load_checkpoint(ckpt)
    del state["settings"]["diffusion_photo"], state["settings"]["prior_weight"]
    save_checkpoint(ckpt, tensors, state)
    changed = r"other settings \(diffusion_photo: 'input' there, 'other' now; prior_weight: 0.0 there, 1.0 now\)"
    with pytest.raises(HDBError, match=changed):
        train_hypernet(faces, lidbs, base, encoder, out, net_settings(steps=4, diffusion_photo="other"),
                       progress=False)
    with pytest.raises(HDBError, match=r"other settings \(prior_weight: 0.0 there, 1.0 now\)"):
        train_hypernet(faces, lidbs, base, encoder, out, net_settings(steps=4), progress=False)
    assert train_hypernet(faces, lidbs, base, encoder, out, net_settings(steps=4, prior_weight=0.0), progress=False)


def test_the_pipeline_hands_every_option_to_its_steps(monkeypatch, tmp_path):
    """`hdb pipeline --weight-space delta --autocast off --shard-size 3 ...` reaches each step unchanged."""
    seen = {}
    for name in ("prepare", "preoptimize", "train-hypernet", "fit-subspace"):
        monkeypatch.setitem(cli.COMMANDS, name, lambda args, name=name: seen.setdefault(name, args) and 0)
    stage1 = ["--weight-space", "delta", "--diffusion-photo", "other", "--input-photos", "4", "--beta", "0.5",
              "--width", "64",
              "--heads", "2", "--ema-decay", "0", "--val-identities", "3", "--warmup-steps", "7"]
    run = ["--trigger", "zwx", "--seed", "3", "--dtype", "fp32", "--no-flip", "--autocast", "off",
           "--gradient-checkpointing"]
    prior = ["--prior-weight", "0.5", "--class-prompt", "a person"]      # stage 0 and stage 1 alike
    assert cli.main(["pipeline", "--data", str(tmp_path), "--base-model", str(tmp_path), "--image-encoder",
                     str(tmp_path), "--output", str(tmp_path / "run"), "--cpu", "--shard-size", "3",
                     "--encode-batch", "5", "--stage0-repeats", "2", *stage1, *run, *prior]) == 0
    parse = cli.build_parser().parse_args
    expected = {
        "prepare": (parse(["prepare", "--data", "d", "--output", "o", "--base-model", "b", "--shard-size", "3",
                           "--encode-batch", "5"]), cli._option_names(cli._prepare_args)),
        "preoptimize": (parse(["preoptimize", "--data", "d", "--output", "o", "--base-model", "b", *run, *prior]),
                        cli._option_names(cli._run_args, cli._gpu_args, cli._prior_args)),
        "train-hypernet": (parse(["train-hypernet", "--data", "d", "--lidbs", "l", "--base-model", "b",
                                  "--output", "o", *stage1, *run, *prior]),
                           cli._option_names(cli._stage1_args, cli._run_args, cli._gpu_args, cli._prior_args)),
    }
    for step, (want, names) in expected.items():
        for name in names:
            if name not in ("cpu", "no_progress"):
                assert getattr(seen[step], name) == getattr(want, name), (step, name)
    assert (seen["train-hypernet"].weight_space, seen["train-hypernet"].diffusion_photo) == ("delta", "other")
    assert (seen["preoptimize"].repeats, seen["train-hypernet"].input_photos) == (2, 4)
    assert all((seen[step].prior_weight, seen[step].class_prompt) == (0.5, "a person")
               for step in ("preoptimize", "train-hypernet"))
    assert seen["preoptimize"].cpu and seen["train-hypernet"].cpu
    assert (seen["fit-subspace"].lidbs, seen["fit-subspace"].output) == (
        str(tmp_path / "run" / "lidbs"), str(tmp_path / "run" / "hypernet.subspace.safetensors"))
    seen.clear()       # a subspace hypernetwork: the subspace it predicts in
    assert cli.main(["pipeline", "--data", str(tmp_path), "--base-model", str(tmp_path), "--image-encoder",
                     str(tmp_path), "--output", str(tmp_path / "run"), "--subspace-components", "8"]) == 0
    assert seen["train-hypernet"].subspace_components == 8 and seen["fit-subspace"].lidbs is None
    assert seen["fit-subspace"].hypernet == str(tmp_path / "run" / "hypernet.safetensors")


def test_the_subspace_hypernetwork_learns_from_the_diffusion_term(stage0, base, tiny_model, hypernet_file, tmp_path,
                                                                  capsys):
    """`--subspace-components`: the subspace of the training identities' stage-0 LiDBs, input statistics of their
    photos, beta 0 by default; the map moves from zero and its prediction lies in that subspace."""
    from hdb_core.hypernet.subspace_model import SubspaceHyperNetwork
    from hdb_core.lidb.subspace import IdentitySubspace, load_subspace, rows_of

    prepared, lidbs, faces = stage0
    out = str(tmp_path / "sub.safetensors")
    assert cli.main(["train-hypernet", "--data", prepared, "--lidbs", lidbs, "--base-model", tiny_model,
                     "--output", out, "--steps", "6", "--batch-size", "2", "--lr", "1e-2", "--val-identities", "0",
                     "--subspace-components", "2", *FAST, *FAST_NET]) == 0
    net = load_hypernet(out)
    assert isinstance(net, SubspaceHyperNetwork) and net.config.components == 2
    assert net.info["beta"] == str(defaults.SUBSPACE_STAGE1_BETA) and net.info["subspace_components"] == "2"
    targets = [load_lidb(os.path.join(lidbs, f)) for f in sorted(os.listdir(lidbs)) if f.endswith(".safetensors")]
    expected = IdentitySubspace.fit(targets, 2)
    torch.testing.assert_close(net.subspace_mean, expected.mean)
    torch.testing.assert_close(net.subspace_directions.abs(), expected.directions.abs(), atol=1e-4, rtol=1e-3)
    assert (net.feature_spread != 1).any() and net.coordinates.weight.abs().sum() > 0
    lidb_out = str(tmp_path / "p.safetensors")
    assert cli.main(["predict", "--hypernet", out, "--image-encoder", os.path.join(tiny_model, "image_encoder"),
                     "--image", os.path.join(faces, "id01.png"), "--output", lidb_out, "--face-check", "none"]) == 0
    offset = rows_of([load_lidb(lidb_out)])[0] - expected.mean
    basis = expected.directions / expected.directions.norm(dim=1, keepdim=True)
    assert offset.norm() > 0 and (offset - basis.T @ (basis @ offset)).norm() < 1e-3 * offset.norm()
    # the subspace it predicts in, as a file for Fast Finetune's identity_subspace / hdb finetune --subspace
    own = str(tmp_path / "sub.subspace.safetensors")
    assert cli.main(["fit-subspace", "--hypernet", out, "--output", own]) == 0
    written = load_subspace(own)
    assert torch.equal(written.mean, net.subspace_mean) and torch.equal(written.directions, net.subspace_directions)
    assert cli.main(["finetune", "--base-model", tiny_model, "--image", os.path.join(faces, "id01.png"),
                     "--init", lidb_out, "--subspace", own, "--output", str(tmp_path / "f.safetensors"),
                     "--steps", "2", "--resolution", "64", "--face-check", "none", "--no-progress"]) == 0
    tuned = rows_of([load_lidb(str(tmp_path / "f.safetensors"))])[0] - expected.mean
    assert (tuned - offset).norm() > 0 and (tuned - basis.T @ (basis @ tuned)).norm() < 1e-3 * tuned.norm()
    assert cli.main(["fit-subspace", "--hypernet", hypernet_file, "--output", str(tmp_path / "x.safetensors")]) == 2
    assert "is a transformer hypernetwork" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x.safetensors")


def test_with_beta_zero_no_target_is_read_and_the_gradient_is_the_diffusion_terms(stage0, base):
    prepared, lidbs, _ = stage0
    net, samples, objective = objective_parts(prepared, lidbs, base, net_settings(beta=0.0))
    batch = samples.batch(0)
    assert "a" not in batch and "b" not in batch, "beta 0: the stage-0 LiDBs are not read per sample"
    with objective:
        norms = objective.backward(objective.terms(net, batch))
        got = [p.grad.clone() for p in net.parameters()]
        net.zero_grad()
        objective.terms(net, batch).diffusion.mean().backward()
    assert norms["weight_grad"] == 0 and norms["diffusion_grad"] > 0
    assert all(torch.equal(g, p.grad) for g, p in zip(got, net.parameters()))
