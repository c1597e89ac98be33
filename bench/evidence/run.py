"""The experiment: stage 0 + stage 1 with the `hdb` pipeline, then one-photo personalisation of held-out identities.

Every start is finetuned with `hdb_core.training.finetune.finetune` (the loop behind
`hdb finetune` and HDB_FastFinetune) on the identity's single input photo, with
the diffusion loss of `hdb finetune --no-flip` (`hdb_core.training.finetune.diffusers_loss_fn`). Intermediate
points of a run are the weights the loop hands to the loss at that step: with a
constant learning rate they are exactly what a shorter run would return.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import torch

from hdb_core.training import data
from hdb_core.training.base_model import encode_latents, load_base_model, tokenize
from hdb_core.training.finetune import diffusers_loss_fn
from hdb_core.training.injector import LowRankInjector
from hdb_core.lidb.file import load_lidb
from hdb_core.training.finetune import FinetuneSettings, finetune, zero_start
from hdb_core.hypernet.file import load_hypernet
from hdb_core.hypernet.image_encoder import ClipImageEncoder
from hdb_core.training.stage0 import PreoptimizeSettings, preoptimize
from hdb_core.training.seeding import generator
from hdb_core.training.stage1 import HypernetSettings, train_hypernet

from . import world as W

METRICS = ("dw", "loss", "sample")
CONTROL_TEACHER = "another identity's teacher"
CONTROL_PREDICTION = "another identity's hypernet prediction"
CONTROL_FULL = "another identity's hypernet + k steps"
RAW = "loss on the teacher's latents before the VAE"
METRIC_NAMES = {"dw": "dW distance to teacher", "loss": "held-out denoising loss", "sample": "sample error vs teacher"}


@dataclass
class Settings:
    world: W.WorldSpec = field(default_factory=W.WorldSpec)
    stage0_steps: int = 200
    stage0_lr: float = 3e-3
    stage0_batch: int = 46
    stage1_steps: int = 800
    stage1_lr: float = 1e-3
    stage1_batch: int = 16
    stage1_alpha: float = 1.0
    stage1_beta: float = 1.0
    width: int = 128
    iterations: int = 4
    ft_lr: float = 1e-3
    ft_rank: int = 4
    hyper_steps: int = 40                 # the paper's finetuning budget from a hypernet start
    zero_steps: int = 400                 # DreamBooth-Agg-1 analogue
    zero_curve: tuple[int, ...] = (0, 10, 20, 40, 70, 100, 150, 200, 300, 400)
    hyper_curve: tuple[int, ...] = (0, 10, 20, 40)
    eval_draws: int = 16                  # noise draws per held-out photo for the denoising loss
    eval_seeds: int = 4                   # sampling seeds for the teacher comparison
    seed: int = 0


def quick() -> Settings:
    """Small enough for the test suite: about 1.5 min on one thread (2.5 with a cold pre-training cache)."""
    return Settings(world=W.WorldSpec(identities=40, held_out=4, vae_steps=80, pretrain_steps=200), stage0_steps=80,
                    stage0_batch=36,
                    stage1_steps=200, stage1_batch=8, width=64, hyper_steps=10, zero_steps=100,
                    zero_curve=(0, 10, 40, 100), hyper_curve=(0, 10), eval_draws=8, eval_seeds=2)


class Evaluator:
    """The three quality measures of a LiDB (as LoRA factors) for one held-out identity; lower is better."""

    def __init__(self, base, injector: LowRankInjector, teacher, photos: torch.Tensor, sample_seeds: list[str],
                 world: W.WorldSpec, latent_scale: float, draws: int, ident: str):
        self.base, self.injector, self.world, self.scale = base, injector, world, latent_scale
        self.names = [s.name for s in teacher.layers]
        self.teacher_dw = {n: teacher.delta(n) for n in self.names}
        self.teacher_norm = math.sqrt(sum(float(d.pow(2).sum()) for d in self.teacher_dw.values()))
        lat = encode_latents(base, data.to_model_range(photos), "cpu")
        g = generator("eval", ident)
        T = base.noise_scheduler.config.num_train_timesteps
        self.x = lat.repeat_interleave(draws, 0)
        self.noise = torch.randn(self.x.shape, generator=g)
        self.t = torch.randint(T, (self.x.shape[0],), generator=g)
        self.ids = tokenize(base, [W.PROMPT] * self.x.shape[0], "cpu")
        self.seeds = sample_seeds
        self.teacher_samples = W.sample(base, injector, [teacher] * len(self.seeds), self.seeds, world, latent_scale)
        self.base_sample_err = self._sample_err(None)

    @torch.no_grad()
    def _sample_err(self, factors) -> float:
        x = W.sample(self.base, self.injector, factors, self.seeds, self.world, self.scale)
        return float((x - self.teacher_samples).pow(2).mean())

    @torch.no_grad()
    def __call__(self, factors) -> dict[str, float]:
        dw = 0.0
        for n in self.names:
            down, up = factors[n]
            dw += float((up @ down - self.teacher_dw[n]).pow(2).sum())
        return {"dw": math.sqrt(dw) / self.teacher_norm, "loss": self.loss(factors),
                "sample": self._sample_err(factors) / self.base_sample_err}

    @torch.no_grad()
    def loss(self, factors, latents: torch.Tensor | None = None) -> float:
        """Denoising loss on the photos as the pipeline encodes them, or on `latents` [K, 4, 8, 8] (same draws)."""
        x = self.x if latents is None else latents.repeat_interleave(self.x.shape[0] // latents.shape[0], 0)
        if factors is None:
            self.injector.clear()
        else:
            self.injector.set_factors(factors)
        context = self.base.text_encoder(self.ids)[0]
        loss = float(self.base.loss(x, self.noise, self.t, context).mean())
        self.injector.clear()
        return loss


def factors_of(lidb) -> dict:
    return {s.name: lidb.down_up(s.name) for s in lidb.layers}


def finetune_curve(base, injector, start, photo_latent, input_ids, steps: int, points, settings: Settings,
                   evaluate) -> dict[int, dict[str, float]]:
    """Finetune `start` on one photo latent for `steps` steps; metrics and LoRA factors at every step in `points`."""
    curve: dict[int, dict[str, float]] = {}
    snapshots: dict[int, dict] = {}
    command_loss = diffusers_loss_fn(base, injector, torch.stack([photo_latent, photo_latent], 1), input_ids,
                                     mirror=False)

    def loss_fn(step, factors, g):
        if step in points:
            snapshots[step] = {n: (d.detach(), u.detach()) for n, (d, u) in factors.items()}
            curve[step] = evaluate(snapshots[step])
        return command_loss(step, factors, g)

    ft = FinetuneSettings(steps=steps, learning_rate=settings.ft_lr, relaxed_rank=settings.ft_rank,
                          seed=settings.seed)
    result = finetune(start, loss_fn, ft, source="finetuned")
    injector.clear()
    if steps in points:
        snapshots[steps] = factors_of(result.lidb)
        curve[steps] = evaluate(snapshots[steps])
    return curve, snapshots


def run(out: str, settings: Settings, log=print) -> dict:
    """The whole experiment; returns {"curves": {start: {step: {metric: [per identity]}}}, "timings": ...}."""
    timings = {}
    t0 = time.time()
    manifest = W.build_world(os.path.join(out, "world"), settings.world, log)
    timings["world"] = time.time() - t0
    base_dir = manifest["base"]
    common = dict(resolution=W.IMAGE_SIZE, face_check="none", min_size=W.IMAGE_SIZE, flip=False, seed=settings.seed)

    t0 = time.time()
    stage0 = os.path.join(out, "stage0")
    preoptimize(manifest["photos"], base_dir, stage0,
                PreoptimizeSettings(steps=settings.stage0_steps, learning_rate=settings.stage0_lr,
                                    batch_size=settings.stage0_batch, checkpoint_every=10 ** 6, **common),
                progress=False)
    timings["stage0"] = time.time() - t0

    t0 = time.time()
    hypernet_path = os.path.join(out, "hypernet.safetensors")
    if not os.path.exists(hypernet_path):
        train_hypernet(manifest["photos"], stage0, base_dir, manifest["image_encoder"], hypernet_path,
                       HypernetSettings(steps=settings.stage1_steps, batch_size=settings.stage1_batch,
                                        learning_rate=settings.stage1_lr, warmup_steps=settings.stage1_steps // 10,
                                        alpha=settings.stage1_alpha, beta=settings.stage1_beta, width=settings.width,
                                        heads=4, iterations=settings.iterations, checkpoint_every=10 ** 6, **common),
                       progress=False)
    timings["stage1"] = time.time() - t0

    t0 = time.time()
    base = load_base_model(base_dir)
    base.to("cpu")
    net = load_hypernet(hypernet_path)
    encoder = ClipImageEncoder.from_pretrained(manifest["image_encoder"])
    layers = base.layers(True)
    injector = base.injector(layers)
    input_ids = tokenize(base, [W.PROMPT], "cpu")
    s = settings
    curves: dict[str, dict[int, dict[str, list[float]]]] = {}
    refs: dict[str, dict[str, list[float]]] = {}

    def add(name, curve):
        for step, m in curve.items():
            for k, v in m.items():
                curves.setdefault(name, {}).setdefault(step, {}).setdefault(k, []).append(v)

    held = manifest["held_out"]

    def photos_of(ident):
        folder = os.path.join(manifest["held_out_photos"], ident)
        return torch.stack([data.prepare_image(os.path.join(folder, p), W.IMAGE_SIZE, "none")
                            for p in sorted(os.listdir(folder))])

    # Controls: the LiDBs of another held-out identity (the next one), scored on this identity's photos. If
    # gains were generic (the world's common look, not the person), they would score as well as its own.
    predicted = {ident: net.predict_lidb(encoder.encode(photos_of(ident)[:1])) for ident in held}
    from safetensors.torch import load_file

    raw_latents = load_file(os.path.join(manifest["base"], "..", "teacher_latents.safetensors"))["latents"]
    teachers = {ident: load_lidb(os.path.join(manifest["teachers"], f"{ident}.safetensors")) for ident in held}
    evaluators, full_method = {}, {}

    def add_ref(ref, values):
        for k, v in values.items():
            refs.setdefault(ref, {}).setdefault(k, []).append(v)

    with injector:
        for n, ident in enumerate(held):
            photos = photos_of(ident)
            teacher = teachers[ident]
            other = held[(n + 1) % len(held)]
            evaluate = Evaluator(base, injector, teacher, photos[1:], [f"{ident}/eval{k}" for k in range(s.eval_seeds)],
                                 s.world, manifest["latent_scale"], s.eval_draws, ident)
            evaluators[ident] = evaluate
            add_ref("teacher", evaluate(factors_of(teacher)))
            # The same check on the latents the teacher sampled, before the VAE round trip of the photo files.
            i = (len(manifest["train"]) + n) * s.world.photos
            raw = raw_latents[i + 1:i + s.world.photos]
            add_ref(RAW, {"base": evaluate.loss(None, raw), "teacher": evaluate.loss(factors_of(teacher), raw),
                          "other teacher": evaluate.loss(factors_of(teachers[other]), raw)})
            add_ref(CONTROL_TEACHER, evaluate(factors_of(teachers[other])))
            add_ref(CONTROL_PREDICTION, evaluate(factors_of(predicted[other])))
            photo_latent = encode_latents(base, data.to_model_range(photos[:1]), "cpu")
            features = encoder.encode(photos[:1])
            starts = {"zero": (zero_start(layers, s.ft_rank, torch.Generator().manual_seed(s.seed)),
                               s.zero_steps, s.zero_curve),
                      "hypernet": (net.predict_lidb(features), max(s.hyper_curve), s.hyper_curve),
                      "hypernet s=1": (net.predict_lidb(features, 1), s.hyper_steps, (0, s.hyper_steps))}
            for name, (start, steps, points) in starts.items():
                curve, snapshots = finetune_curve(base, injector, start, photo_latent, input_ids, steps,
                                                  set(points), s, evaluate)
                add(name, curve)
                if name == "hypernet":
                    full_method[ident] = snapshots[s.hyper_steps]
            log(f"  held-out {n + 1}/{len(manifest['held_out'])} {ident}: "
                + ", ".join(f"{k} {curves[k][p]['loss'][-1]:.4f}" for k, p in
                            (("hypernet", 0), ("hypernet", s.hyper_steps), ("zero", s.hyper_steps),
                             ("zero", s.zero_steps))))
        for n, ident in enumerate(held):
            add_ref(CONTROL_FULL, evaluators[ident](full_method[held[(n + 1) % len(held)]]))
    timings["eval"] = time.time() - t0
    return {"curves": curves, "refs": refs, "timings": timings, "manifest": manifest}
