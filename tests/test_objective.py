"""One objective: the ComfyUI path (through model_sampling) and the diffusers path compute the same
loss on the same weights, and the node and the `hdb finetune` command make the same LiDB."""
from __future__ import annotations

import os

import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image

from hdb_core import cli, load_lidb
from hdb_core.lidb.batch import lidb_factors
from hdb_core.lidb.weights import LiDB, LiDBConfig
from hdb_core.training.base_model import BaseModel
from hdb_core.training.injector import LowRankInjector
from hdb_core.training.objective import diffusers_loss

from devtools import comfy_runtime, tiny_diffusers, tiny_models

TIMESTEPS = (3, 250, 600, 999)


@pytest.fixture(scope="module")
def twin(comfy):
    """The same tiny weights as diffusers/transformers models and as ComfyUI MODEL/CLIP/VAE."""
    unet, vae, te, tok, sched, _ = tiny_diffusers.build("twin", seed=3)
    return (unet, vae, te, tok, sched), tiny_models.comfy_twin(unet, vae, te)


def _random_lidb(layers, seed):
    g = torch.Generator().manual_seed(seed)
    lidb = LiDB.zeros(layers, LiDBConfig())
    return lidb.with_tensors({k: torch.randn(v.shape, generator=g) * 0.3 for k, v in lidb.a_train.items()},
                             {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in lidb.b_train.items()})


@pytest.mark.parametrize("v_prediction", [False, True])
def test_comfy_objective_equals_diffusers_objective(comfy, twin, v_prediction):
    (unet, vae, te, tok, sched), _ = twin
    if v_prediction:
        sched = DDPMScheduler.from_config(sched.config, prediction_type="v_prediction")
    model, clip, _ = tiny_models.comfy_twin(unet, vae, te, v_prediction=v_prediction)
    nodes = comfy["pack"].nodes
    objective, ct = nodes.comfy_objective, nodes.comfy_targets
    base = BaseModel(unet, vae, te, tok, sched, "twin")
    lidb = _random_lidb(base.layers(text_encoder=False), seed=1)      # residuals on both sides, same names
    unet_t = ct.unet_targets(model)
    assert sorted(unet_t) == sorted(s.name for s in lidb.layers)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    ids = tok(["a ohwx face"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad(), base.injector(lidb.layers) as d_inj, \
            LowRankInjector(ct.target_modules(model.model, unet_t)) as c_inj:
        d_inj.set_factors(lidb_factors(lidb))
        c_inj.set_factors(lidb_factors(lidb))
        context = te(ids)[0]
        conds = objective.conditioning(model.model, context, None, x0, 64, torch.device("cpu"))
        for t in TIMESTEPS:
            want = diffusers_loss(unet, sched, x0, noise, torch.tensor([t]), context)
            got = objective.model_loss(model, x0, noise, t, conds)
            torch.testing.assert_close(got, want, rtol=2e-4, atol=1e-6)


@pytest.fixture(scope="module")
def twin_folder(twin, tmp_path_factory) -> str:
    """The twin's diffusers weights saved as a pipeline folder (what `hdb` loads)."""
    from diffusers import StableDiffusionPipeline

    (unet, vae, te, tok, sched), _ = twin
    folder = str(tmp_path_factory.mktemp("twin"))
    StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.mark.parametrize("prior_weight", [0.0, 1.0])
def test_node_and_cli_make_the_same_lidb(comfy, node, twin, twin_folder, tmp_path, prior_weight):
    """Same photo, same defaults, same seed: HDB_FastFinetune and `hdb finetune` agree to float tolerance,
    with the prior term too (its two passes through each twin's model)."""
    _, (model, clip, comfy_vae) = twin
    folder = twin_folder
    g = torch.Generator().manual_seed(7)
    pixels = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8, generator=g), size=(64, 64), mode="bilinear")
    photo = (pixels[0].permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
    png = str(tmp_path / "face.png")
    Image.fromarray(photo).save(png)

    steps = ["--steps", "3", "--prior-weight", str(prior_weight), "--class-prompt", "a face"]
    out = str(tmp_path / "cli.safetensors")
    assert cli.main(["finetune", "--image", png, "--output", out, "--base-model", folder, "--face-check", "none",
                     "--resolution", "64", "--no-progress", "--cpu", *steps]) == 0
    from_cli = load_lidb(out)

    image = torch.from_numpy(photo).float().div(255)[None]           # what Load Image gives the node
    from_node, _ = comfy_runtime.call_node(node("HDB_FastFinetune"), model=model, clip=clip, vae=comfy_vae,
                                           image=image, resolution=64, steps=3, prior_weight=prior_weight,
                                           class_prompt="a face")
    assert from_node.info["trigger"] == from_cli.info["trigger"]
    assert sorted(s.name for s in from_node.layers) == sorted(s.name for s in from_cli.layers)
    moved = 0.0
    for spec in from_cli.layers:
        for mine, theirs in ((from_node.a_train, from_cli.a_train), (from_node.b_train, from_cli.b_train)):
            # ComfyUI's UNet and diffusers' round differently, and CPUs differently again: 3.8e-5 apart on one
            # 2-core machine (within 2e-5 on another); `moved` below checks the steps did move the LiDB
            torch.testing.assert_close(mine[spec.name], theirs[spec.name], rtol=1e-3, atol=5e-5)
        moved += float(from_cli.b_train[spec.name].abs().sum())
    assert moved > 0, "three steps must move the LiDB away from its zero start"
    assert os.path.getsize(out) > 0


def test_a_loss_of_k_draws_in_one_batch_is_the_step_of_k_single_draws(twin_folder):
    """`diffusers_loss_fn(draws=K)` with one draw per step makes the same step as K single draws per step
    (the same draws in the same order, their mean): what lets the evidence bench batch a step's draws."""
    from hdb_core.training.base_model import load_base_model, tokenize
    from hdb_core.training.finetune import FinetuneSettings, diffusers_loss_fn, finetune, zero_start

    base = load_base_model(twin_folder)
    layers = base.layers(True)
    start = zero_start(layers, 4, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 2, 4, 8, 8, generator=g)        # two photos and their mirrors
    ids = tokenize(base, ["a ohwx face"], "cpu")
    with base.injector(layers) as injector:
        single = finetune(start, diffusers_loss_fn(base, injector, latents, ids, True),
                          FinetuneSettings(steps=3, learning_rate=1e-2, draws_per_step=4)).lidb
        batched = finetune(start, diffusers_loss_fn(base, injector, latents, ids, True, draws=4),
                           FinetuneSettings(steps=3, learning_rate=1e-2, draws_per_step=1)).lidb
        other = finetune(start, diffusers_loss_fn(base, injector, latents, ids, True),
                         FinetuneSettings(steps=3, learning_rate=1e-2, draws_per_step=1)).lidb

    def apart(a, b):     # largest dW difference of any layer, relative to that layer's largest dW
        return max(float((a.delta(s.name) - b.delta(s.name)).abs().max() / a.delta(s.name).abs().max())
                   for s in layers)

    # float rounding of a batch against single passes, which Adam's first steps magnify where a gradient
    # is near zero: 3e-4 to 5e-4 measured; one draw per step instead of four is another run altogether
    assert apart(single, batched) < 2e-3
    assert apart(single, other) > 0.05


def test_the_prior_term_keeps_the_class_prompt_as_the_base_model_makes_it(twin_folder):
    """Finetuned on one photo with the trigger, the class prompt's output moves far less with the prior term
    than without it, the trigger's much less so (the identity is still learnt)."""
    from hdb_core.training.base_model import load_base_model, tokenize
    from hdb_core.training.finetune import FinetuneSettings, diffusers_loss_fn, finetune, zero_start
    from hdb_core.training.objective import diffusers_output

    base = load_base_model(twin_folder)
    layers = base.layers(True)
    start = zero_start(layers, 4, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 2, 4, 8, 8, generator=g)
    trigger, face = tokenize(base, ["a ohwx face"], "cpu"), tokenize(base, ["a face"], "cpu")
    probe_x, probe_noise = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    probe_t = torch.linspace(50, 950, 6).long()

    def outputs(factors, ids):
        injector.set_factors(factors)
        with torch.no_grad():
            return diffusers_output(base.unet, base.noise_scheduler, probe_x, probe_noise, probe_t,
                                    base.text_encoder(ids)[0].expand(6, -1, -1))

    def moved(lidb, ids):      # mean squared change of the model's output against the bare model's
        return float((outputs(lidb_factors(lidb), ids) - outputs({}, ids)).pow(2).mean())

    with base.injector(layers) as injector:
        runs = {w: finetune(start, diffusers_loss_fn(base, injector, latents, trigger, False, draws=2,
                                                     prior_ids=face, prior_weight=w),
                            FinetuneSettings(steps=15, learning_rate=3e-2)).lidb for w in (0.0, 1.0)}
        plain, held = ({"trigger": moved(runs[w], trigger), "face": moved(runs[w], face)} for w in (0.0, 1.0))
    # measured: the class prompt's change 0.38 of the plain run's, the trigger's 0.68 (this random tiny text
    # encoder gives the two prompts close features, so the trigger's output is held back some too)
    kept = {k: held[k] / plain[k] for k in plain}
    assert kept["face"] < 0.5 and kept["trigger"] > 1.4 * kept["face"], (plain, held)
