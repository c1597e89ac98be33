"""The one injector: shared and per-sample factors, fused-projection row slices, double-wrap
detection and clean removal, on plain Linears and on real diffusers/transformers models."""
from __future__ import annotations

import pytest
import torch

from hdb_core.errors import HDBError
from hdb_core.lidb.batch import LayerFactors, lidb_factors, stack_train
from hdb_core.lidb.weights import LiDB, LiDBConfig
from hdb_core.training.injector import LowRankInjector


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


# -- plain Linears ---------------------------------------------------------------------------------
def test_row_slices_of_a_fused_projection_equal_separate_residuals():
    torch.manual_seed(0)
    fused = torch.nn.Linear(8, 12)                # q, k, v stacked: rows 0-3, 4-7, 8-11
    x = torch.randn(2, 5, 8)
    factors = {n: (torch.randn(1, 8), torch.randn(4, 1)) for n in ("q", "k", "v")}
    with LowRankInjector({n: (fused, (4 * i, 4)) for i, n in enumerate(("q", "k", "v"))}) as inj:
        inj.set_factors(factors)
        out = fused(x)
    delta = torch.cat([up @ down for down, up in (factors[n] for n in ("q", "k", "v"))])   # [12, 8]
    with torch.no_grad():
        expected = x @ (fused.weight + delta).T + fused.bias
    assert torch.allclose(out, expected, atol=1e-5)
    inj.set_factors({"k": factors["k"]})          # detached again: no hook, no effect
    assert torch.equal(fused(x), torch.nn.functional.linear(x, fused.weight, fused.bias))


def test_slices_that_leave_rows_untouched_as_flux_linear1_does():
    """q, k, v in the first rows of a wider fused output (Flux's single-block linear1 also holds the MLP
    input); any subset of them set, in any order: each slice changes, every other row stays."""
    torch.manual_seed(0)
    fused = torch.nn.Linear(8, 20)                # q 0-3, k 4-7, v 8-11, MLP input 12-19
    x = torch.randn(2, 5, 8)
    factors = {n: (torch.randn(1, 8), torch.randn(4, 1)) for n in ("q", "k", "v")}
    targets = {n: (fused, (4 * i, 4)) for i, n in reversed(list(enumerate(("q", "k", "v"))))}
    for chosen in (("q", "k", "v"), ("k",), ("v", "q")):
        with LowRankInjector(targets) as inj, torch.no_grad():
            inj.set_factors({n: factors[n] for n in chosen})
            out = fused(x)
            delta = torch.zeros(20, 8)
            for i, n in enumerate(("q", "k", "v")):
                if n in chosen:
                    delta[4 * i:4 * i + 4] = factors[n][1] @ factors[n][0]
            expected = x @ (fused.weight + delta).T + fused.bias
        assert torch.allclose(out, expected, atol=1e-5), chosen


def test_a_second_injector_on_the_same_layer_is_refused_and_removal_is_clean():
    lin = torch.nn.Linear(4, 4)
    with LowRankInjector({"a": lin}):
        with pytest.raises(HDBError, match="already carries"):
            LowRankInjector({"b": lin}).attach()
        assert len(lin._forward_hooks) == 1, "the refused injector left nothing behind"
    assert not lin._forward_hooks and not hasattr(lin, "_hdb_low_rank_injector")
    with LowRankInjector({"b": lin}):             # free again once the first one is gone
        pass


def test_hooks_are_removed_when_the_block_fails():
    lin = torch.nn.Linear(4, 4)
    with pytest.raises(RuntimeError), LowRankInjector({"a": lin}):
        raise RuntimeError("cancelled")
    assert not lin._forward_hooks


# -- real models -------------------------------------------------------------------------------------
def test_batched_residuals_equal_each_sample_alone(base):
    layers = base.layers(text_encoder=False)
    lidbs = random_lidbs(layers, 3)
    x, t, ctx = unet_inputs(3)
    with torch.no_grad(), base.injector(layers) as inj:
        inj.set_factors(lidb_factors(lidbs))
        batched = base.unet(x, t, ctx).sample
        alone = []
        for i in range(3):
            inj.set_factors(lidb_factors(lidbs[i]))
            alone.append(base.unet(x[i:i + 1], t[i:i + 1], ctx[i:i + 1]).sample)
        inj.clear()
        plain = base.unet(x, t, ctx).sample
    alone = torch.cat(alone)
    assert torch.allclose(batched, alone, atol=1e-5, rtol=1e-4)
    assert (batched - plain).abs().max() > 1e-3  # the residuals really change the output


def test_residual_matches_a_merged_weight(base):
    """x @ (W + up @ down)^T: the hook adds exactly the LiDB's dW, text encoder included."""
    layers = base.layers()
    (lidb,) = random_lidbs(layers, 1, seed=3)
    ids = base.tokenizer(["a ohwx face"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        with base.injector(layers) as inj:
            inj.set_factors(lidb_factors(lidb))
            injected = base.text_encoder(ids)[0]
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
    assert torch.allclose(injected, merged, atol=1e-5, rtol=1e-4)


def test_one_lidb_broadcasts_and_tiles_over_cfg_batches(base):
    layers = base.layers(text_encoder=False)
    lidbs = random_lidbs(layers, 2, seed=1)
    x, t, ctx = unet_inputs(4)
    with torch.no_grad(), base.injector(layers) as inj:
        inj.set_factors(lidb_factors(lidbs[0]))
        one = base.unet(x, t, ctx).sample
        inj.set_factors(lidb_factors([lidbs[0]] * 4))
        four = base.unet(x, t, ctx).sample
        inj.set_factors(lidb_factors(lidbs))                      # [uncond a, uncond b, cond a, cond b]
        tiled = base.unet(x, t, ctx).sample
        inj.set_factors(lidb_factors(lidbs + lidbs))
        explicit = base.unet(x, t, ctx).sample
        inj.set_factors(lidb_factors(random_lidbs(layers, 3)))
        with pytest.raises(HDBError, match="cannot use 3 per-sample LiDBs"):
            base.unet(x, t, ctx)
    assert torch.allclose(one, four, atol=1e-6) and torch.allclose(tiled, explicit, atol=1e-6)


def test_injection_leaves_the_model_untouched_and_gradients_reach_the_train_matrices(base, hash_weights):
    layers = base.layers()
    before = hash_weights(base.unet), hash_weights(base.text_encoder)
    a, b = stack_train(random_lidbs(layers, 2))
    a = {k: v.requires_grad_(True) for k, v in a.items()}
    b = {k: v.requires_grad_(True) for k, v in b.items()}
    factors = LayerFactors(LiDBConfig(), layers, "cpu")
    x, t, _ = unet_inputs(2)
    ids = base.tokenizer(["a ohwx face"] * 2, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with base.injector(layers) as inj:
        inj.set_factors(factors.named(a, b))
        out = base.unet(x, t, base.text_encoder(ids)[0]).sample
        out.pow(2).mean().backward()
    assert not any(m._forward_hooks for m in base.unet.modules())  # hooks removed
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in (*a.values(), *b.values()))
    assert (hash_weights(base.unet), hash_weights(base.text_encoder)) == before
    assert not any(p.requires_grad for p in base.unet.parameters())


def test_injector_refuses_lidbs_of_another_model(base):
    other = [s for s in base.layers()][:-1] + [type(base.layers()[0])("unet.mid_block.nothing.to_q", 32, 32)]
    with pytest.raises(HDBError, match="base model"):
        base.injector(other)
