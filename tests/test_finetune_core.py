"""hdb_core.training.finetune and hdb_core.plots: the UI-free finetune loop, on plain torch."""
from __future__ import annotations

import math

import pytest
import torch

from hdb_core.errors import HDBError
from hdb_core.training.finetune import FinetuneSettings, TrainableLiDB, finetune, relaxed_start, zero_start
from hdb_core.lidb.weights import AUX, FREE, LiDB, LiDBConfig
from hdb_core.plots import loss_curve_image, running_mean
from hdb_core.lidb.targets import LayerSpec

LAYERS = [LayerSpec("unet.down.attn1.to_q", 160, 120), LayerSpec("unet.mid.attn2.to_k", 96, 64),
          LayerSpec("te.text_model.encoder.layers.0.self_attn.q_proj", 48, 48)]



def rank1_init(seed: int = 0) -> LiDB:
    """A rank-1 LiDB with non-zero A and B, as a hypernetwork would predict."""
    g = torch.Generator().manual_seed(seed)
    lidb = LiDB.zeros(LAYERS, LiDBConfig(), trigger="a ohwx face", source="predicted")
    for s in LAYERS:
        a_l, b_l = lidb.config.layer_dims(s)
        lidb.a_train[s.name] = torch.randn(a_l, 1, generator=g) * 0.1
        lidb.b_train[s.name] = torch.randn(1, b_l, generator=g) * 0.1
    return lidb


def toy_loss(target: dict[str, torch.Tensor]):
    """Regression of every layer's dW onto a fixed target: a loss whose minimum is known."""
    def loss(step, factors, generator):
        return sum(((up @ down) - target[n]).pow(2).sum() for n, (down, up) in factors.items())
    return loss


def reachable_target(rank: int = 2, seed: int = 5) -> dict[str, torch.Tensor]:
    """dW of another LiDB: reachable by the factorisation, so the loss can go to zero."""
    other = relaxed_start(rank1_init(seed), rank, torch.Generator().manual_seed(seed))
    for s in LAYERS:
        other.b_train[s.name] = torch.randn(other.b_train[s.name].shape,
                                            generator=torch.Generator().manual_seed(1)) * 0.1
    return {s.name: other.delta(s.name) for s in LAYERS}


def test_relaxed_rank_reproduces_the_init_dw_exactly_at_step_0():
    init = rank1_init()
    relaxed = relaxed_start(init, 4, torch.Generator().manual_seed(3))
    assert relaxed.config.rank == 4
    for s in LAYERS:
        assert torch.equal(relaxed.delta(s.name), init.delta(s.name)), s.name
        assert relaxed.a_train[s.name].shape[1] == 4 and relaxed.b_train[s.name].shape[0] == 4
        # The new components can learn at once: random A columns (B rows start at zero).
        assert relaxed.a_train[s.name][:, 1:].abs().sum() > 0
    # The factors the training loop hands to the loss at step 0 give the same dW too.
    factors = TrainableLiDB(relaxed, torch.device("cpu")).factors()
    for s in LAYERS:
        down, up = factors[s.name]
        assert torch.equal(up @ down, init.delta(s.name))


def test_relaxing_to_a_lower_rank_is_refused():
    start = relaxed_start(rank1_init(), 4, torch.Generator().manual_seed(0))
    with pytest.raises(HDBError, match="relaxed_rank"):
        relaxed_start(start, 2, torch.Generator())


def test_loop_optimises_all_train_matrices_and_lowers_the_loss():
    init = rank1_init()
    target = reachable_target()
    settings = FinetuneSettings(steps=60, learning_rate=1e-2, relaxed_rank=3, seed=1)
    seen = []
    result = finetune(init, toy_loss(target), settings, progress=lambda i, n, loss: seen.append((i, n, loss)),
                      trigger="a ohwx face")
    assert [s[0] for s in seen] == list(range(1, 61)) and all(s[1] == 60 for s in seen)
    assert result.losses == [s[2] for s in seen]
    assert result.losses[-1] < 0.5 * result.losses[0]
    out = result.lidb
    assert out.config.rank == 3 and out.is_finite()
    assert out.info["trigger"] == "a ohwx face" and out.info["source"] == "predicted"
    relaxed = relaxed_start(init, 3, torch.Generator().manual_seed(1))
    for s in LAYERS:  # every matrix moved, including the first (the init's) component
        assert not torch.equal(out.a_train[s.name], relaxed.a_train[s.name])
        assert not torch.equal(out.b_train[s.name][0], relaxed.b_train[s.name][0])
    # The input LiDB is never mutated.
    again = rank1_init()
    assert all(torch.equal(init.a_train[n], again.a_train[n]) for n in init.a_train)


def test_only_the_chosen_components_train():
    init = rank1_init()
    target = reachable_target()
    settings = FinetuneSettings(steps=5, learning_rate=1e-2, relaxed_rank=2, seed=0, trainable=frozenset({"unet"}))
    out = finetune(init, toy_loss(target), settings).lidb
    relaxed = relaxed_start(init, 2, torch.Generator().manual_seed(0))
    te = LAYERS[2].name
    assert torch.equal(out.a_train[te], relaxed.a_train[te]) and torch.equal(out.b_train[te], relaxed.b_train[te])
    assert not torch.equal(out.b_train[LAYERS[0].name], relaxed.b_train[LAYERS[0].name])


def test_same_seed_same_result_and_different_seed_differs():
    def noisy_loss(step, factors, generator):
        noise = torch.randn(8, generator=generator)
        return sum((up @ down).mean() ** 2 for down, up in factors.values()) + 1e-3 * (noise.sum() * sum(
            up.sum() for _, up in factors.values()))

    start = zero_start(LAYERS, 2, torch.Generator().manual_seed(0))
    def run(seed):
        return finetune(start, noisy_loss, FinetuneSettings(steps=4, learning_rate=1e-2, relaxed_rank=2,
                                                            seed=seed)).lidb

    a, b, c = run(7), run(7), run(8)
    assert all(torch.equal(a.b_train[n], b.b_train[n]) for n in a.b_train)
    assert any(not torch.equal(a.b_train[n], c.b_train[n]) for n in a.b_train)


def test_each_step_follows_the_mean_of_its_draws():
    """draws_per_step K: K loss calls per step (each drawing from the run's generator), one optimizer step on
    their mean gradient, their mean as the step's loss; K = 1 is the plain loop."""
    target = reachable_target()
    start = zero_start(LAYERS, 2, torch.Generator().manual_seed(0))
    calls = []

    def noisy_loss(step, factors, generator):
        weight = 1.0 + float(torch.rand((), generator=generator))      # a different loss per draw
        calls.append((step, weight))
        return weight * toy_loss(target)(step, factors, generator)

    shown = []

    def run(draws, fn=noisy_loss):
        calls.clear()
        shown.clear()
        return finetune(start, fn, FinetuneSettings(steps=3, learning_rate=1e-2, relaxed_rank=2, seed=0,
                                                    draws_per_step=draws),
                        progress=lambda i, n, loss: shown.append(loss))

    four = run(4)
    assert [c[0] for c in calls] == [0] * 4 + [1] * 4 + [2] * 4 and len(four.losses) == 3
    assert shown == four.losses, "the progress bar shows each step's mean loss, not its last draw's"
    weights = [w for _, w in calls[:4]]
    first = toy_loss(target)(0, {n: (d, u) for n, (d, u) in TrainableLiDB(
        relaxed_start(start, 2, torch.Generator().manual_seed(0)), torch.device("cpu")).factors().items()},
        torch.Generator())
    assert four.losses[0] == pytest.approx(float(first.detach()) * sum(weights) / 4, rel=1e-5)

    # the same draws' mean as one loss, one draw per step: the same weights (Adam sees the same gradient)
    def mean_of_four(step, factors, generator):
        return sum(noisy_loss(step, factors, generator) for _ in range(4)) / 4

    one = run(1, mean_of_four)
    for n in four.lidb.b_train:
        torch.testing.assert_close(four.lidb.b_train[n], one.lidb.b_train[n], rtol=1e-5, atol=1e-7)
    with pytest.raises(HDBError, match="draws_per_step is 0"):
        run(0)


def test_zero_start_has_zero_dw_but_learns():
    start = zero_start(LAYERS, 4, torch.Generator().manual_seed(0), source="trained")
    assert start.config.rank == 4 and start.info["source"] == "trained"
    assert all(start.delta(s.name).abs().max() == 0 for s in LAYERS)
    target = reachable_target()
    out = finetune(start, toy_loss(target), FinetuneSettings(steps=10, learning_rate=1e-2, relaxed_rank=4)).lidb
    assert all(out.delta(s.name).abs().max() > 0 for s in LAYERS)


def test_non_finite_loss_stops_with_a_clear_error_and_returns_nothing():
    def exploding(step, factors, generator):
        value = sum(up.sum() * down.sum() for down, up in factors.values())
        return value * (float("nan") if step == 2 else 1.0)

    calls = []
    with pytest.raises(HDBError, match=r"loss became nan at step 3 of 10.*learning_rate"):
        finetune(rank1_init(), exploding, FinetuneSettings(steps=10, learning_rate=1e-3),
                 progress=lambda *a: calls.append(a))
    assert len(calls) == 2


def test_cancel_callback_stops_between_steps():
    class Cancelled(Exception):
        pass

    count = {"n": 0}

    def check():
        if count["n"] == 3:
            raise Cancelled()

    def loss(step, factors, generator):
        count["n"] += 1
        return sum(up.pow(2).sum() + down.pow(2).sum() for down, up in factors.values())

    with pytest.raises(Cancelled):
        finetune(rank1_init(), loss, FinetuneSettings(steps=10), check_cancel=check)
    assert count["n"] == 3


@pytest.mark.parametrize("steps,lr", [(0, 1e-3), (5, 0.0), (5, float("nan"))])
def test_bad_settings_are_refused(steps, lr):
    with pytest.raises(HDBError):
        finetune(rank1_init(), toy_loss({}), FinetuneSettings(steps=steps, learning_rate=lr))


def test_loss_curve_image_is_a_comfy_image_and_shows_the_curve():
    losses = [1.0 / (i + 1) for i in range(40)]
    img = loss_curve_image(losses, "test curve")
    assert img.shape[0] == 1 and img.shape[-1] == 3 and img.dtype == torch.float32
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    blue = (img[0, ..., 2] > 0.6) & (img[0, ..., 0] < 0.3)
    assert blue.sum() > 100  # the running-mean curve is drawn
    # Falling losses: the curve starts high (top left) and ends low (bottom right).
    cols = blue.nonzero()
    left, right = cols[cols[:, 1] < cols[:, 1].min() + 20], cols[cols[:, 1] > cols[:, 1].max() - 20]
    assert left[:, 0].float().mean() < right[:, 0].float().mean()
    # Degenerate inputs still give an image.
    for values in ([], [2.0], [1.0, float("nan"), 0.5]):
        assert loss_curve_image(values, "x").shape == img.shape


def test_running_mean_is_centred():
    assert running_mean([0, 0, 3, 0, 0], 3) == [0, 1, 1, 1, 0]
    assert all(math.isclose(a, b) for a, b in zip(running_mean([1.0, 2.0], 1), [1.0, 2.0]))


# -- the paper's relaxation: the start kept, a free LoRA beside it ---------------------------------
def test_free_relaxation_keeps_the_start_and_trains_only_a_free_lora_outside_the_aux_subspace():
    init = rank1_init()
    start = relaxed_start(init, 4, torch.Generator().manual_seed(3), "free_lora")
    assert start.relaxation == "free_lora" and start.free_rank == 4 and start.config.rank == 1
    for s in LAYERS:
        assert torch.equal(start.delta(s.name), init.delta(s.name)), "step 0 reproduces the start exactly"
    # A target outside every layer's aux subspace: a rank-2 dW from random full-width factors.
    g = torch.Generator().manual_seed(9)
    target = {s.name: torch.randn(s.out_features, 2, generator=g) @ torch.randn(2, s.in_features, generator=g) * 0.05
              for s in LAYERS}
    settings = dict(steps=150, learning_rate=2e-2, relaxed_rank=4, seed=0)
    free = finetune(init, toy_loss(target), FinetuneSettings(relaxation="free_lora", **settings)).lidb
    aux = finetune(init, toy_loss(target), FinetuneSettings(relaxation="aux_subspace", **settings)).lidb
    for s in LAYERS:
        assert torch.equal(free.a_train[s.name], init.a_train[s.name]), "the prediction is kept as it is"
        assert torch.equal(free.b_train[s.name], init.b_train[s.name])
    err = {kind: sum(float((lidb.delta(n) - target[n]).pow(2).sum()) for n in target)
           for kind, lidb in (("free", free), ("aux", aux))}
    # The aux subspace of the 160 -> 120 layer holds 100 x 50 of its 120 x 160 directions: only the free
    # LoRA can reach this target.
    assert err["free"] < 0.2 * err["aux"], err
    down, up = free.down_up(LAYERS[0].name)
    assert down.shape == (1 + 4, 160) and up.shape == (120, 1 + 4), "exported rank = aux rank + free rank"


def test_a_free_lidb_is_refused_as_the_start_of_another_free_relaxation():
    start = relaxed_start(rank1_init(), 2, torch.Generator(), "free_lora")
    with pytest.raises(HDBError, match="already has a free LoRA part"):
        relaxed_start(start, 2, torch.Generator(), "free_lora")



MANY = [LayerSpec(f"unet.block{i}.attn1.to_{p}", 64, 64) for i in range(4) for p in "qkv"] + \
       [LayerSpec(f"unet.block{i}.attn2.to_k", 96, 64) for i in range(3)] + LAYERS


def factor_pass(lidb: LiDB, grouped: bool, weight: dict[str, torch.Tensor]):
    """Factors, gradients and the aten ops of building them and backpropagating a loss through them."""
    from devtools.op_count import OpCount

    weights = TrainableLiDB(lidb, torch.device("cpu"), grouped=grouped)
    with OpCount() as count:
        factors = weights.factors()
        torch.stack([((up @ down) * weight[n]).sum() for n, (down, up) in factors.items()]).sum().backward()
    return factors, [p.grad for p in weights.trainable_parameters()], count.ops


@pytest.mark.parametrize("relaxation", [AUX, FREE])
def test_the_grouped_factor_build_matches_the_per_layer_one(relaxation):
    g = torch.Generator().manual_seed(0)
    start = LiDB.trainable_start(MANY, LiDBConfig(), g)
    start = start.with_tensors(start.a_train, {n: torch.randn(b.shape, generator=g) for n, b in start.b_train.items()})
    lidb = relaxed_start(start, 4, torch.Generator().manual_seed(1), relaxation)
    weight = {s.name: torch.randn(s.out_features, s.in_features, generator=g) for s in MANY}
    per_layer, grads, _ = factor_pass(lidb, False, weight)
    grouped, grouped_grads, _ = factor_pass(lidb, True, weight)
    for name, (down, up) in per_layer.items():
        assert torch.allclose(grouped[name][0], down, rtol=1e-5, atol=1e-6), name
        assert torch.allclose(grouped[name][1], up, rtol=1e-5, atol=1e-6), name
    assert len(grads) == len(grouped_grads) > 0
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(grads, grouped_grads))


def test_the_grouped_build_of_identities_stacked_for_training_matches_the_per_layer_one():
    """Stage 0 trains a chunk of identities and stage 1 predicts a batch: train matrices [N, a_l, r]."""
    from hdb_core.lidb.batch import LayerFactors, stack_train

    g = torch.Generator().manual_seed(2)
    config = LiDBConfig(rank=2)
    lidbs = [LiDB.trainable_start(MANY, config, g) for _ in range(3)]
    lidbs = [x.with_tensors(x.a_train, {n: torch.randn(b.shape, generator=g) for n, b in x.b_train.items()})
             for x in lidbs]
    weight = {s.name: torch.randn(s.out_features, s.in_features, generator=g) for s in MANY}

    def build(grouped: bool):
        a, b = stack_train(lidbs)
        params = [t.requires_grad_(True) for t in (*a.values(), *b.values())]
        factors = LayerFactors(config, MANY, "cpu", grouped).named(a, b)
        torch.stack([((up @ down) * weight[n]).sum() for n, (down, up) in factors.items()]).sum().backward()
        return factors, [p.grad for p in params]

    per_layer, grads = build(False)
    grouped, grouped_grads = build(True)
    for s in MANY:
        down, up = per_layer[s.name]
        assert down.shape == (3, 2, s.in_features) and up.shape == (3, s.out_features, 2)
        for i, lidb in enumerate(lidbs):     # row i is identity i's own factors
            assert torch.allclose(up[i] @ down[i], lidb.delta(s.name), rtol=1e-5, atol=1e-6), s.name
        assert torch.allclose(grouped[s.name][0], down, rtol=1e-5, atol=1e-6), s.name
        assert torch.allclose(grouped[s.name][1], up, rtol=1e-5, atol=1e-6), s.name
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(grads, grouped_grads))


def test_the_grouped_build_does_not_grow_in_ops_with_the_layers_that_share_a_shape():
    def ops(n: int, grouped: bool) -> int:
        layers = [LayerSpec(f"unet.block{i}.attn1.to_q", 64, 64) for i in range(n)]
        lidb = relaxed_start(LiDB.trainable_start(layers, LiDBConfig(), torch.Generator().manual_seed(0)), 4,
                             torch.Generator().manual_seed(1))
        weight = {s.name: torch.ones(64, 64) for s in layers}
        return factor_pass(lidb, grouped, weight)[2]

    # what 8 more layers add: grouped, only the loss's own ops (16 a layer here); per layer, about 74 a layer
    grouped_growth, per_layer_growth = ops(16, True) - ops(8, True), ops(16, False) - ops(8, False)
    assert grouped_growth < 0.3 * per_layer_growth, (grouped_growth, per_layer_growth)
    assert ops(16, True) < ops(16, False) / 3


def test_the_factors_are_grouped_off_the_cpu_by_default():
    lidb = relaxed_start(rank1_init(), 2, torch.Generator().manual_seed(0))
    assert not TrainableLiDB(lidb, torch.device("cpu")).build.grouped
    on_meta = TrainableLiDB(lidb, torch.device("meta"))
    assert on_meta.build.grouped and set(on_meta.factors()) == {s.name for s in LAYERS}
