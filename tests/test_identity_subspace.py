"""hdb_core.lidb.subspace and finetuning inside it (`FinetuneSettings.subspace`), on plain torch."""
from __future__ import annotations

import pytest
import torch

from hdb_core.errors import HDBError
from hdb_core.lidb.subspace import IdentitySubspace, load_subspace, rows_of, save_subspace
from hdb_core.lidb.weights import LiDB, LiDBConfig
from hdb_core.training.finetune import FinetuneSettings, SubspaceLiDB, finetune

from tests.test_finetune_core import LAYERS, rank1_init, toy_loss


def family(n: int, k: int = 3, seed: int = 0) -> list[LiDB]:
    """n rank-1 LiDBs on a k-dimensional affine family (mean + k directions), plus nothing else."""
    g = torch.Generator().manual_seed(seed)
    like = rank1_init(seed)
    mean = rows_of([like])[0]
    directions = torch.randn(k, mean.numel(), generator=g) * 0.05
    rows = mean + torch.randn(n, k, generator=g) @ directions
    sub = IdentitySubspace(like.layers, like.config, mean, directions)
    return [sub.lidb(r, source="trained") for r in rows]


def in_span(row: torch.Tensor, sub: IdentitySubspace) -> float:
    """Relative size of the part of (row - mean) outside the subspace's directions."""
    offset = (row - sub.mean).double()
    q, _ = torch.linalg.qr(sub.directions.double().T)
    return float((offset - q @ (q.T @ offset)).norm() / offset.norm().clamp_min(1e-30))


def test_fit_recovers_a_low_dimensional_family_and_caps_the_components():
    lidbs = family(12, k=3)
    sub = IdentitySubspace.fit(lidbs, 8)
    assert sub.components == 8 and sub.info["identities"] == 12
    assert sub.info["variance"] == pytest.approx(1.0, abs=1e-4)
    three = IdentitySubspace.fit(lidbs, 3)
    assert all(in_span(r, three) < 1e-3 for r in rows_of(lidbs))          # 3 directions hold the whole family
    assert IdentitySubspace.fit(lidbs[:4], 128).components == 3             # at most one fewer than LiDBs
    # the directions are scaled by their spread: a coefficient of 1 is one standard deviation
    coeffs = torch.linalg.lstsq(three.directions.double().T, (rows_of(lidbs) - three.mean).double().T).solution
    assert coeffs.std(1).mean() == pytest.approx(1.0, rel=0.05)
    for bad in ([], lidbs[:1]):
        with pytest.raises(HDBError, match="at least 2"):
            IdentitySubspace.fit(bad, 4)


def test_the_randomised_svd_for_many_identities_finds_the_exact_directions(monkeypatch):
    from hdb_core.lidb import subspace as module

    lidbs = family(40, k=3, seed=2)
    rows = rows_of(lidbs)
    rows = rows + 1e-4 * torch.randn(rows.shape, generator=torch.Generator().manual_seed(0))
    exact = IdentitySubspace.fit_rows(rows.clone(), lidbs[0].layers, lidbs[0].config, 3)
    monkeypatch.setattr(module, "EXACT_SVD_LIMIT", 10)
    randomised = IdentitySubspace.fit_rows(rows.clone(), lidbs[0].layers, lidbs[0].config, 3)
    assert randomised.mean.dtype == torch.float32 and torch.allclose(randomised.mean, exact.mean, atol=1e-6)
    torch.testing.assert_close(randomised.directions.norm(dim=1), exact.directions.norm(dim=1), rtol=1e-3, atol=0)
    q_exact, _ = torch.linalg.qr(exact.directions.double().T)
    q_random, _ = torch.linalg.qr(randomised.directions.double().T)
    assert torch.linalg.svdvals(q_exact.T @ q_random).min() > 0.999        # the same 3-dimensional span
    assert randomised.info["variance"] == pytest.approx(exact.info["variance"], abs=1e-3)


def test_rows_and_lidbs_round_trip_and_files_load_identically(tmp_path):
    lidbs = family(6)
    sub = IdentitySubspace.fit(lidbs, 4)
    back = sub.lidb(rows_of(lidbs[:1])[0])
    assert all(torch.equal(back.a_train[n], lidbs[0].a_train[n]) and torch.equal(back.b_train[n], lidbs[0].b_train[n])
               for n in back.a_train)
    path = save_subspace(sub, str(tmp_path / "subspace.safetensors"))
    loaded = load_subspace(path)
    assert torch.equal(loaded.mean, sub.mean) and torch.equal(loaded.directions, sub.directions)
    assert loaded.layers == sub.layers and loaded.config == sub.config and loaded.info["identities"] == "6"


def test_bad_subspace_files_get_one_sentence(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(HDBError, match="does not exist; put identity subspaces"):
        load_subspace(str(tmp_path / "missing.safetensors"))
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(HDBError, match="is not an identity subspace"):
        load_subspace(str(tmp_path / "other.safetensors"))
    sub = IdentitySubspace.fit(family(5), 2)
    damaged = IdentitySubspace(sub.layers, sub.config, sub.mean[:-1], sub.directions)
    save_subspace(damaged, str(tmp_path / "damaged.safetensors"))
    with pytest.raises(HDBError, match="do not match its layer list"):
        load_subspace(str(tmp_path / "damaged.safetensors"))


def test_finetuning_in_the_subspace_starts_at_the_start_and_moves_only_within_it():
    lidbs = family(10, k=3)
    sub = IdentitySubspace.fit(lidbs, 3)
    # a prediction: another member of the family, a little outside the subspace
    start_row = rows_of(lidbs[:1])[0] + 1e-3 * torch.randn(sub.mean.numel(), generator=torch.Generator().manual_seed(1))
    start = sub.lidb(start_row, source="predicted")
    assert in_span(start_row, sub) > 1e-3
    factors = SubspaceLiDB(start, sub, torch.device("cpu")).factors()
    grouped = SubspaceLiDB(start, sub, torch.device("cpu"), grouped=True).factors()   # as on a GPU
    for s in LAYERS:                                       # step 0 is the start exactly
        down, up = factors[s.name]
        assert torch.equal(up @ down, start.delta(s.name))
        assert torch.allclose(grouped[s.name][1] @ grouped[s.name][0], start.delta(s.name), rtol=1e-5, atol=1e-7)
    target = {s.name: lidbs[3].delta(s.name) for s in LAYERS}
    result = finetune(start, toy_loss(target), FinetuneSettings(steps=60, learning_rate=0.1, subspace=sub),
                      source="finetuned")
    assert result.losses[-1] < 0.5 * result.losses[0]
    out = result.lidb
    assert out.config == start.config and not out.free_down and out.info["source"] == "finetuned"
    moved = rows_of([out])[0] - start_row
    assert moved.norm() > 0
    q, _ = torch.linalg.qr(sub.directions.double().T)
    assert float((moved.double() - q @ (q.T @ moved.double())).norm() / moved.norm()) < 1e-4
    assert torch.equal(rows_of([start])[0], start_row)     # the start is never mutated


def test_subspace_finetune_keeps_untrained_components_and_refuses_another_layout():
    sub = IdentitySubspace.fit(family(8), 3)
    start = rank1_init(2)
    target = {s.name: torch.randn(s.out_features, s.in_features) * 1e-3 for s in LAYERS}
    out = finetune(start, toy_loss(target), FinetuneSettings(steps=5, learning_rate=0.1, subspace=sub,
                                                             trainable=frozenset({"unet"}))).lidb
    te = LAYERS[2].name
    assert torch.equal(out.a_train[te], start.a_train[te]) and torch.equal(out.b_train[te], start.b_train[te])
    assert not torch.equal(out.b_train[LAYERS[0].name], start.b_train[LAYERS[0].name])
    free = start.with_free_lora(2, torch.Generator().manual_seed(0))
    with pytest.raises(HDBError, match="has a free LoRA part"):
        finetune(free, toy_loss(target), FinetuneSettings(steps=1, learning_rate=0.1, subspace=sub))
    other = LiDB.zeros(LAYERS[:2], LiDBConfig())
    with pytest.raises(HDBError, match="fit to LiDBs of another model"):
        finetune(other, toy_loss(target), FinetuneSettings(steps=1, learning_rate=0.1, subspace=sub))


def test_cli_fits_a_subspace_and_finetunes_within_it_from_its_mean(tmp_path, capsys):
    """`hdb fit-subspace` on a folder of LiDBs, then `hdb finetune --subspace` without --init on a tiny model."""
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from devtools import tiny_diffusers
    from hdb_core import cli
    from hdb_core.lidb.file import load_lidb, save_lidb
    from hdb_core.training.base_model import load_base_model

    unet, vae, te, tok, sched, _ = tiny_diffusers.build("tiny", seed=0)
    folder = str(tmp_path / "model")
    StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched, safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(folder)
    layers = load_base_model(folder).layers(True)
    g = torch.Generator().manual_seed(0)
    lidbs = str(tmp_path / "lidbs")
    for i in range(4):
        lidb = LiDB.trainable_start(layers, LiDBConfig(), g)
        save_lidb(lidb.with_tensors(lidb.a_train, {k: 0.05 * torch.randn(v.shape, generator=g)
                                                   for k, v in lidb.b_train.items()}), f"{lidbs}/id{i}.safetensors")
    out = str(tmp_path / "hn.subspace.safetensors")
    assert cli.main(["fit-subspace", "--lidbs", lidbs, "--output", out, "--components", "8"]) == 0
    assert "3 directions" in capsys.readouterr().out                     # capped at one fewer than 4 LiDBs
    assert cli.main(["fit-subspace", "--lidbs", str(tmp_path / "nowhere"), "--output", out]) == 2
    assert "does not exist; pass the output folder of `hdb preoptimize`" in capsys.readouterr().err
    mixed = str(tmp_path / "mixed")
    save_lidb(LiDB.zeros(layers, LiDBConfig()), f"{mixed}/a.safetensors")
    assert cli.main(["fit-subspace", "--lidbs", mixed, "--output", out]) == 2
    assert "holds 1 LiDB file(s)" in capsys.readouterr().err
    save_lidb(LiDB.zeros(layers[:3], LiDBConfig()), f"{mixed}/b.safetensors")
    assert cli.main(["fit-subspace", "--lidbs", mixed, "--output", out]) == 2
    assert "'b.safetensors' was made for another model" in capsys.readouterr().err

    png = str(tmp_path / "face.png")
    Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).byte().numpy()).save(png)
    result = str(tmp_path / "ft.safetensors")
    assert cli.main(["finetune", "--image", png, "--output", result, "--base-model", folder, "--face-check", "none",
                     "--resolution", "64", "--steps", "3", "--subspace", out, "--no-progress", "--cpu"]) == 0
    subspace = load_subspace(out)
    finetuned = load_lidb(result)
    row = rows_of([finetuned])[0]
    assert finetuned.config.rank == 1 and (row - subspace.mean).norm() > 0 and in_span(row, subspace) < 1e-4
