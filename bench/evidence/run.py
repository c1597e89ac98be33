"""The experiment: identity gate, stage 0 + stage 1 with the `hdb` pipeline, then one-photo personalisation.

Order: build the world, fit the identity recognizer on the training identities'
teacher samples (`identity.py`), check the GATE (the teacher must beat the base
model on the identity metric for >= 90 % of held-out identities; if not, nothing
else is run), then stage 0 and stage 1 on the training identities' photos, then
for every held-out identity (one input photo) each start finetuned with
`hdb_core.training.finetune.finetune` on that photo with the loss of
`hdb finetune --no-flip` (`diffusers_loss_fn`) at Fast Finetune's default draws
per step, the draws of a step in one batch (its `draws`).

Held-out identities are split into validation identities (the finetuning
learning rate of every arm is picked on them from a small grid, by mean cosine
similarity; where the best rate is at the grid's edge the grid grows past it,
`grid_extensions` times at most; the zero start's search needs no network, so with
two workers it runs in another process during stage 0 and stage 1) and test
identities (all reported numbers). An arm's LiDB is judged
by DDIM samples of base + LiDB from seeds the recognizer never saw: identity
(rank-1, cosine), editability (the same seeds with the styled prompt: the share of
the known edit kept, and identity once the edit is taken out), prior drift ("a
face" samples against the base's) and the held-out denoising loss. The weights
at step k of a run are those the loop hands to the loss at step k: with a
constant learning rate they are exactly what a k-step run returns.
"""
from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass, field, replace
from functools import partial

import torch

from hdb_core.defaults import FINETUNE_DRAWS, STAGE_PRIOR_WEIGHT, SUBSPACE_STAGE1_BETA
from hdb_core.hypernet.file import load_hypernet
from hdb_core.hypernet.image_encoder import ClipImageEncoder
from hdb_core.lidb.file import load_lidb
from hdb_core.lidb.subspace import IdentitySubspace, fit_folder, load_subspace, save_subspace
from hdb_core.training import data
from hdb_core.training.base_model import encode_latents, load_base_model, tokenize
from hdb_core.training.finetune import FinetuneSettings, diffusers_loss_fn, finetune, zero_start
from hdb_core.training.seeding import generator
from hdb_core.training.stage0 import PreoptimizeSettings, preoptimize
from hdb_core.training.stage1 import HypernetSettings, train_hypernet

from . import world as W
from .identity import Recognizer
from .workers import in_background, in_workers

GATE_SHARE = 0.9
SUBSPACE_NET = "subspace-hypernet"     # the network kind and arm prefix of the subspace hypernetwork
RELAXED = f"{SUBSPACE_NET}-relaxed"     # its prediction finetuned like the transformer's (default rank relaxation)


@dataclass
class Settings:
    world: W.WorldSpec = field(default_factory=lambda: W.WorldSpec(identities=200, held_out=20, vae_steps=800))
    validation: int = 4                   # held-out identities used only to choose learning rates
    stage0_steps: int = 200
    stage0_lr: float = 1e-2              # stage-0 LiDBs: rank-1 0.40 on 20 training ids (3e-3: 0.30)
    stage0_batch: int = 46
    stage1_steps: int = 500
    stage1_lr: float = 1e-3
    stage1_batch: int = 16
    stage1_alpha: float = 1.0
    stage1_beta: float = 1.0
    width: int = 128
    iterations: int = 4
    single_pass_network: bool = True      # also train a network with 1 refinement pass and compare it
    ft_rank: int = 4
    draws: int = FINETUNE_DRAWS           # per finetune step, as Fast Finetune's default (one batch here)
    prior_weight: float = 0.0             # the finetune's prior term for W.FACE_PROMPT (0: off)
    stage_prior_weight: float = STAGE_PRIOR_WEIGHT   # stage 0's and stage 1's prior term for W.FACE_PROMPT, as `hdb`'s
    hyper_points: tuple[int, ...] = (0, 10, 20, 40)
    zero_points: tuple[int, ...] = (40, 100, 200, 400)
    hyper_lrs: tuple[float, ...] = (3e-4, 1e-3, 3e-3)
    zero_lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    subspace_components: int = 128       # identity subspace of the stage-0 LiDBs (0: no subspace arms)
    subspace_hyper_points: tuple[int, ...] = (10, 20, 40)   # hypernet prediction + k steps in the subspace
    subspace_mean_points: tuple[int, ...] = (40, 100)       # the subspace's mean + k steps in it
    subspace_lrs: tuple[float, ...] = (0.03, 0.1, 0.3)      # coefficients are in units of the targets' spread
    # rounds that add the next rate (1-3 per decade) past a grid edge where an arm's best rate sits: a rate at
    # the edge is not known to be the best (measured: zero + 40 and the subspace network + 40 chose an edge)
    grid_extensions: int = 2
    # the subspace hypernetwork (`--subspace-components`, beta 0): its prediction alone and + k steps in its
    # subspace; trained in a second process beside the transformer networks (0 steps: not trained)
    subspace_net_steps: int = 1000
    subspace_net_lr: float = 3e-4        # evidence_probe.py amortize: 1e-3 diverged
    subspace_net_batch: int = 46
    eval_samples: int = 8                 # DDIM samples per arm for the identity metric (and the drift)
    eval_draws: int = 8                   # noise draws per held-out photo for the secondary denoising loss
    pca_dims: int = 64
    lda_dims: int = 24
    bootstrap: int = 2000
    seed: int = 0
    workers: int = 1                      # processes for the per-identity evaluation (results do not change)

    @property
    def key_steps(self) -> tuple[int, int]:
        """(k, long): hypernet + k is compared with zero + k and zero + long."""
        return max(self.hyper_points), max(self.zero_points)


def quick() -> Settings:
    """Small enough for the test suite (a few minutes on one thread with the pre-training cache)."""
    return Settings(world=W.WorldSpec(identities=40, held_out=8, vae_steps=300, gallery=12), validation=2,
                    stage0_steps=80, stage0_batch=32, stage1_steps=200, stage1_batch=8, width=64,
                    hyper_points=(0, 10, 40), zero_points=(40, 100), hyper_lrs=(1e-3, 3e-3),
                    zero_lrs=(3e-3, 1e-2), subspace_components=24, subspace_hyper_points=(10, 40),
                    subspace_mean_points=(40,), subspace_lrs=(0.1, 0.3), subspace_net_steps=300, subspace_net_batch=16,
                    subspace_net_lr=1e-3, single_pass_network=False, eval_samples=6, grid_extensions=0,
                    eval_draws=4, lda_dims=16, bootstrap=1000)


def scaled() -> Settings:
    """The full run with 820 more training identities (photos only) and 4x the stage-1 steps, without the
    s = 1 network: measured with `evidence_probe.py`, the hypernetwork generalises with more people."""
    return Settings(world=W.WorldSpec(identities=200, held_out=20, vae_steps=800, extra_train=820),
                    stage1_steps=2000, stage1_lr=2e-3, single_pass_network=False)


def factors_of(lidb) -> dict:
    return {s.name: lidb.down_up(s.name) for s in lidb.layers}


class Judge:
    """Everything measured about one LiDB (as LoRA factors) for one held-out identity."""

    def __init__(self, base, injector, recognizer: Recognizer, photos: torch.Tensor, ident: str, s: Settings):
        self.base, self.injector, self.rec, self.ident, self.s = base, injector, recognizer, ident, s
        self.seeds = [f"{ident}/eval{k}" for k in range(s.eval_samples)]
        self.face_seeds = [f"{ident}/face{k}" for k in range(s.eval_samples)]
        # prior drift: "a face" samples with the LiDB against the base's from the same seeds
        self.base_face = W.sample(base, injector, None, self.face_seeds, s.world, prompt=W.FACE_PROMPT)
        self.style = W.style_direction(s.world)
        lat = encode_latents(base, data.to_model_range(photos), "cpu")
        g = generator("eval", ident)
        T = base.noise_scheduler.config.num_train_timesteps
        self.x = lat.repeat_interleave(s.eval_draws, 0)
        self.noise = torch.randn(self.x.shape, generator=g)
        self.t = torch.randint(T, (self.x.shape[0],), generator=g)
        self.ids = tokenize(base, [W.PROMPT] * self.x.shape[0], "cpu")

    @torch.no_grad()
    def cosine(self, factors) -> float:
        """Only the identity cosine (what the learning rates are chosen by): the plain-prompt samples of
        `__call__`, without the styled and "a face" ones."""
        return self.rec.score(W.sample(self.base, self.injector, factors, self.seeds, self.s.world),
                              self.ident)["cos"]

    @torch.no_grad()
    def __call__(self, factors) -> dict[str, float]:
        samples = W.sample(self.base, self.injector, factors, self.seeds, self.s.world)
        out = self.rec.score(samples, self.ident)
        # editability: the same seeds with the styled prompt; how much of the known edit is made, and
        # whether the person is still there once the edit is taken out again
        styled = W.sample(self.base, self.injector, factors, self.seeds, self.s.world,
                          prompt=W.PROMPT + W.STYLE_SUFFIX)
        out["style"] = float(((styled - samples) * self.style).sum((1, 2, 3)).mean() / self.style.pow(2).sum())
        styled_id = self.rec.score(styled - self.style, self.ident)
        out["styled_cos"], out["styled_rank1"] = styled_id["cos"], styled_id["rank1"]
        face = W.sample(self.base, self.injector, factors, self.face_seeds, self.s.world, prompt=W.FACE_PROMPT)
        out["drift"] = float((face - self.base_face).pow(2).sum((1, 2, 3)).mean())
        out["loss"] = self.loss(factors)
        return out

    @torch.no_grad()
    def loss(self, factors) -> float:
        if factors is None:
            self.injector.clear()
        else:
            self.injector.set_factors(factors)
        context = self.base.text_encoder(self.ids)[0]
        loss = float(self.base.loss(self.x, self.noise, self.t, context).mean())
        self.injector.clear()
        return loss


def finetune_points(base, injector, start, photo_latent, input_ids, points, lr: float, s: Settings,
                    subspace: IdentitySubspace | None = None) -> dict:
    """Finetune `start` on one photo latent (within `subspace` if given), `s.draws` draws per step; LoRA
    factors after every step count in `points`."""
    snapshots: dict[int, dict] = {}
    command_loss = diffusers_loss_fn(base, injector, torch.stack([photo_latent, photo_latent], 1), input_ids,
                                     mirror=False, draws=s.draws, prior_weight=s.prior_weight,
                                     prior_ids=tokenize(base, [W.FACE_PROMPT], "cpu") if s.prior_weight else None)
    wanted = set(points)

    def loss_fn(step, factors, g):
        if step in wanted:
            snapshots[step] = {n: (d.detach().clone(), u.detach().clone()) for n, (d, u) in factors.items()}
        return command_loss(step, factors, g)

    steps = max(points)
    if steps == 0:
        from hdb_core.training.finetune import relaxed_start
        return {0: factors_of(relaxed_start(start, s.ft_rank, torch.Generator().manual_seed(s.seed)))}
    result = finetune(start, loss_fn, FinetuneSettings(steps=steps, learning_rate=lr, relaxed_rank=s.ft_rank,
                                                       draws_per_step=1, seed=s.seed, subspace=subspace),
                      source="finetuned")
    injector.clear()
    snapshots[steps] = factors_of(result.lidb)
    return snapshots


def next_rate(lr: float, up: bool) -> float:
    """The neighbour of `lr` on the ladder ..., 0.3, 1, 3, 10, ... (times a power of ten) the grids are made of."""
    ones = lr / 10 ** math.floor(math.log10(lr) + 1e-9) < 2      # 1e-3 and not 3e-3
    factor = (3.0 if ones else 10 / 3) if up else (0.3 if ones else 1 / 3)
    return float(f"{lr * factor:.3g}")


def _validation_total(values: list[float]) -> float:
    """The summed validation cosine of one arm at one rate; a run that diverged (not finite) never wins."""
    total = sum(values)
    return total if math.isfinite(total) else -math.inf


def best_rate(val_cos: dict[tuple[str, int, float], list[float]], kind: str, steps: int, lrs: list[float]) -> float:
    """The rate of `lrs` with the highest summed validation cosine for arm (kind, steps); ties: the first."""
    return max(lrs, key=lambda lr: _validation_total(val_cos[(kind, steps, lr)]))


def rates_past_edges(val_cos: dict[tuple[str, int, float], list[float]], tried: dict[str, list[float]],
                     points: dict[str, tuple[int, ...]]) -> dict[str, list[float]]:
    """{kind: rates to try next}: for every arm (kind, steps > 0) whose best validation rate is the lowest or
    highest its kind has tried, the next rate beyond it."""
    new: dict[str, list[float]] = {}
    for kind, lrs in tried.items():
        for p in points[kind]:
            if not p:
                continue
            best = best_rate(val_cos, kind, p, lrs)
            if best == min(lrs):
                beyond = next_rate(best, up=False)
            elif best == max(lrs):
                beyond = next_rate(best, up=True)
            else:
                continue
            if beyond not in lrs and beyond not in new.get(kind, []):
                new.setdefault(kind, []).append(beyond)
    return new


def bootstrap_ci(diffs: list[float], n: int, seed: int = 0) -> tuple[float, float, float]:
    """Mean of paired differences and its percentile-bootstrap 95 % interval (identities resampled)."""
    t = torch.tensor(diffs, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(diffs), (n, len(diffs)), generator=g)
    means = t[idx].mean(1).sort().values
    return float(t.mean()), float(means[int(0.025 * n)]), float(means[min(n - 1, int(0.975 * n))])


def run(out: str, settings: Settings, log=print) -> dict:
    """The whole experiment; see the module doc. result["gate"]["passed"] False means it stopped at the gate."""
    s = settings
    timings = {}
    t0 = time.time()
    manifest = W.build_world(os.path.join(out, "world"), s.world, log, s.workers)
    timings["world"] = time.time() - t0

    t0 = time.time()
    saved = W.load_teacher_latents(os.path.join(out, "world"))
    names = manifest["train"] + manifest["held_out"]
    n_train, per = len(manifest["train"]), s.world.gallery
    gallery = saved["gallery"].reshape(len(names), per, 4, 8, 8)
    labels = torch.arange(n_train).repeat_interleave(per)
    rec = Recognizer.fit(gallery[:n_train].reshape(-1, 4, 8, 8), labels, s.pca_dims, s.lda_dims)
    rec.enrol(names, gallery)
    world_stats = {k: manifest[k] for k in ("vae_error", "photo_distance_within", "identity_distance_between",
                                             "distance_ratio", "encoded_distance_within",
                                             "encoded_distance_between", "encoded_distance_ratio", "base_spread")}
    held = manifest["held_out"]
    hg = gallery[n_train:]
    # recognizer-space separation of the held-out identities (never used to fit it)
    world_stats["recognizer_within"], world_stats["recognizer_between"], world_stats["recognizer_ratio"] = \
        rec.separation(hg)
    # The photos as sampled and as the pipeline encodes them after the PNG round trip, per held-out identity.
    k = s.world.photos
    for key, lat in (("photos_raw", saved["latents"]), ("photos_encoded", saved["encoded"])):
        lat = lat.reshape(len(names), k, 4, 8, 8)[n_train:]
        scores = [rec.score(lat[i], ident) for i, ident in enumerate(held)]
        world_stats[f"{key}_rank1"] = sum(x["rank1"] for x in scores) / len(held)
        world_stats[f"{key}_cos"] = sum(x["cos"] for x in scores) / len(held)
        one = [rec.score(lat[i, :1], ident) for i, ident in enumerate(held)]
        world_stats[f"{key}_one_rank1"] = sum(x["rank1"] for x in one) / len(held)
        if key == "photos_encoded":
            # The test identities' input photo (photo 0, as the pipeline encodes it) judged as one sample:
            # what a finetune on that photo alone has to copy.
            test_photo = one[s.validation:]
    world_stats["input_photo_test_rank1"] = sum(x["rank1"] for x in test_photo)
    world_stats["input_photo_test_identities"] = len(test_photo)
    world_stats["input_photo_test_cos"] = statistics.fmean(x["cos"] for x in test_photo)
    log("world: " + ", ".join(f"{a} {b:.3f}" for a, b in world_stats.items()))

    base = load_base_model(manifest["base"])
    base.to("cpu")
    layers = base.layers(True)
    injector = base.injector(layers)
    teachers = {ident: load_lidb(os.path.join(manifest["teachers"], f"{ident}.safetensors")) for ident in held}

    def photos_of(ident):
        folder = os.path.join(manifest["held_out_photos"], ident)
        return torch.stack([data.prepare_image(os.path.join(folder, p), W.IMAGE_SIZE, "none")
                            for p in sorted(os.listdir(folder))])

    with injector:
        judges = {ident: Judge(base, injector, rec, photos_of(ident)[1:], ident, s) for ident in held}
        refs: dict[str, dict[str, list[float]]] = {}

        def add(table, arm, values):
            for key, v in values.items():
                table.setdefault(arm, {}).setdefault(key, []).append(v)

        def gate_scores(n):
            """The teacher, the base model and another identity's teacher judged for held-out identity n."""
            judge = judges[held[n]]
            return (judge(factors_of(teachers[held[n]])), judge(None),
                    judge(factors_of(teachers[held[(n + 1) % len(held)]])))

        gate_rows = []
        for n, (t_score, b_score, o_score) in enumerate(in_workers(gate_scores, list(range(len(held))), s.workers)):
            ident = held[n]
            gate_rows.append((ident, t_score["cos"], b_score["cos"], t_score["rank1"], b_score["rank1"]))
            if n >= s.validation:
                add(refs, "teacher", t_score)
                add(refs, "base", b_score)
                add(refs, "another identity's teacher", o_score)
    wins = sum(t > b for _, t, b, _, _ in gate_rows)
    gate = {"wins": wins, "identities": len(held), "share": wins / len(held),
            "passed": wins / len(held) >= GATE_SHARE, "rows": gate_rows,
            "teacher_rank1": sum(r[3] for r in gate_rows) / len(held),
            "base_rank1": sum(r[4] for r in gate_rows) / len(held)}
    log(f"GATE: teacher beats the base model on identity cosine for {wins}/{len(held)} held-out identities "
        f"(need {GATE_SHARE:.0%}); rank-1 teacher {gate['teacher_rank1']:.2f}, base {gate['base_rank1']:.2f} "
        f"-> {'PASSED' if gate['passed'] else 'FAILED'}")
    timings["gate"] = time.time() - t0
    result = {"gate": gate, "world_stats": world_stats, "manifest": manifest, "timings": timings}
    if not gate["passed"]:
        return result

    input_ids = tokenize(base, [W.PROMPT], "cpu")
    val, test = held[: s.validation], held[s.validation:]
    k, long = s.key_steps
    networks: dict = {}         # filled after stage 1; the zero start needs none of them
    encoder = subspace = None

    # (kind, learning rates, step counts): "hypernet-sub" and "mean-sub" finetune only the coefficients of
    # the identity subspace, from the prediction and from the subspace's mean (the mean stage-0 LiDB)
    families = [("hypernet", s.hyper_lrs, s.hyper_points), ("zero", s.zero_lrs, s.zero_points)]
    if s.subspace_components:
        families += [("hypernet-sub", s.subspace_lrs, s.subspace_hyper_points),
                     ("mean-sub", s.subspace_lrs, s.subspace_mean_points)]
    if s.subspace_net_steps:      # finetuned in its own subspace (the same fit as `subspace`)
        families.append((SUBSPACE_NET, s.subspace_lrs, (0, *s.subspace_hyper_points)))
        families.append((RELAXED, s.hyper_lrs, tuple(p for p in s.hyper_points if p)))
    network_of = {"hypernet-sub": "hypernet", RELAXED: SUBSPACE_NET}
    points_of = {kind: points for kind, _, points in families}

    def start_of(kind, ident, photos):
        if kind == "zero":
            return zero_start(layers, s.ft_rank, torch.Generator().manual_seed(s.seed))
        if kind == "mean-sub":
            return subspace.lidb(subspace.mean)
        return networks[network_of.get(kind, kind)].predict_lidb(encoder.encode(photos[:1]))

    def arm_scores(kind, ident, lr, points, measure=None):
        """{step: measure(factors)} of one finetune of arm `kind` (default measure: everything the judge
        measures)."""
        photos = photos_of(ident)
        latent = encode_latents(base, data.to_model_range(photos[:1]), "cpu")
        space = (networks[kind].subspace() if kind == SUBSPACE_NET else subspace if kind.endswith("-sub")
                 else None)
        snaps = finetune_points(base, injector, start_of(kind, ident, photos), latent, input_ids, points, lr, s,
                                space)
        return {p: (measure or judges[ident])(snaps[p]) for p in points}

    def validation_run(ident, rates: dict[str, list[float]]):
        cos = {}
        for kind, lrs in rates.items():
            for lr in lrs:
                for p, c in arm_scores(kind, ident, lr, points_of[kind], judges[ident].cosine).items():
                    cos[(kind, p, lr)] = c
        log(f"  validation {ident} done ({', '.join(rates)})")
        return cos

    def search_rates(kinds: list[str], workers: int):
        """Validation cosines {(kind, steps, lr): [per identity]} and the rates tried {kind: [lr]} of `kinds`,
        each kind's grid grown past an edge where one of its arms peaks."""
        val_cos: dict[tuple[str, int, float], list[float]] = {}
        tried = {kind: list(lrs) for kind, lrs, _ in families if kind in kinds}
        rates = dict(tried)
        with injector:
            for extension in range(s.grid_extensions + 1):
                if extension:
                    rates = rates_past_edges(val_cos, tried, points_of)
                    if not rates:
                        break
                    log("  grid grown past its edge: " + ", ".join(f"{kind} {lr:g}" for kind, lrs in rates.items()
                                                                  for lr in lrs))
                    for kind, lrs in rates.items():
                        tried[kind] = tried[kind] + lrs
                for cos in in_workers(partial(validation_run, rates=rates), val, workers):
                    for key, value in cos.items():
                        val_cos.setdefault(key, []).append(value)
        return val_cos, tried

    # The zero start's learning rates need neither stage 0 nor stage 1: chosen meanwhile in another process
    # (stage 0 trains on one core).
    zero_search = in_background(partial(search_rates, ["zero"], 1), fork=s.workers > 1)

    # stages 0 and 1 train on the prompt the finetunes train on and the judge samples with
    common = dict(trigger=W.PROMPT, resolution=W.IMAGE_SIZE, face_check="none", min_size=W.IMAGE_SIZE, flip=False,
                  seed=s.seed, prior_weight=s.stage_prior_weight, class_prompt=W.FACE_PROMPT)
    t0 = time.time()
    stage0 = os.path.join(out, "stage0")
    preoptimize(manifest["photos"], manifest["base"], stage0,
                PreoptimizeSettings(steps=s.stage0_steps, learning_rate=s.stage0_lr, batch_size=s.stage0_batch,
                                    checkpoint_every=10 ** 6, **common), progress=False)
    timings["stage0"] = time.time() - t0
    t0 = time.time()
    # the evidence keeps its own validation identities, and uses raw weights only
    stage1 = dict(checkpoint_every=10 ** 6, val_identities=0, ema_decay=0, **common)
    nets = {"hypernet": HypernetSettings(steps=s.stage1_steps, batch_size=s.stage1_batch, learning_rate=s.stage1_lr,
                                         warmup_steps=s.stage1_steps // 10, alpha=s.stage1_alpha, beta=s.stage1_beta,
                                         width=s.width, heads=4, iterations=s.iterations, **stage1)}
    if s.single_pass_network:   # its own network trained with one pass, not the s = 4 one truncated
        nets["hypernet(s=1)"] = replace(nets["hypernet"], iterations=1)
    if s.subspace_net_steps:
        nets[SUBSPACE_NET] = HypernetSettings(steps=s.subspace_net_steps, batch_size=s.subspace_net_batch,
                                              learning_rate=s.subspace_net_lr, warmup_steps=s.subspace_net_steps // 10,
                                              beta=SUBSPACE_STAGE1_BETA, subspace_components=s.subspace_components,
                                              **stage1)

    def train(kind):
        path = os.path.join(out, f"{kind}.safetensors")
        if not os.path.exists(path):
            train_hypernet(manifest["photos"], stage0, manifest["base"], manifest["image_encoder"], path, nets[kind],
                           progress=False)

    # the transformers in one process and the subspace network in another (the numbers do not change)
    in_workers(lambda group: [train(kind) for kind in group],
               [[k for k in nets if k != SUBSPACE_NET], [k for k in nets if k == SUBSPACE_NET]], s.workers)
    if s.subspace_components:
        path = os.path.join(out, "subspace.safetensors")
        if not os.path.exists(path):
            save_subspace(fit_folder(stage0, s.subspace_components, progress=False), path)
        subspace = load_subspace(path)
    timings["stage1"] = time.time() - t0

    t0 = time.time()
    networks.update((kind, load_hypernet(os.path.join(out, f"{kind}.safetensors"))) for kind in nets)
    net = networks["hypernet"]
    encoder = ClipImageEncoder.from_pretrained(manifest["image_encoder"])

    def test_run(n):
        ident, scores = test[n], []
        runs = [(kind, points) for kind, _, points in families]
        if s.single_pass_network:
            runs.append(("hypernet(s=1)", (0, k)))    # at the learning rates chosen for the s = 4 network
        for kind, points in runs:
            by_lr: dict[float, list[int]] = {}
            for p in points:
                by_lr.setdefault(chosen[("hypernet" if kind == "hypernet(s=1)" else kind, p)] if p
                                 else s.hyper_lrs[0], []).append(p)
            for lr, pts in by_lr.items():
                scores += [(f"{kind}+{p}", sc) for p, sc in arm_scores(kind, ident, lr, pts).items()]
        other = test[(n + 1) % len(test)]
        control = judges[ident](factors_of(net.predict_lidb(encoder.encode(photos_of(other)[:1]))))
        cos = {arm: sc["cos"] for arm, sc in scores}
        log(f"  test {n + 1}/{len(test)} {ident}: cos hypernet+0 {cos['hypernet+0']:.3f}, "
            f"hypernet+{k} {cos[f'hypernet+{k}']:.3f}, zero+{k} {cos[f'zero+{k}']:.3f}, "
            f"zero+{long} {cos[f'zero+{long}']:.3f}, teacher {refs['teacher']['cos'][n]:.3f}")
        return scores, control

    # learning rate per arm on the validation identities
    val_cos, tried = search_rates([kind for kind, _, _ in families if kind != "zero"], s.workers)
    zero_cos, zero_tried = zero_search()
    val_cos.update(zero_cos)
    tried = {kind: (zero_tried if kind == "zero" else tried)[kind] for kind, _, _ in families}
    chosen = {}
    for kind, lrs in tried.items():
        for p in points_of[kind]:
            chosen[(kind, p)] = best_rate(val_cos, kind, p, lrs)
    arms: dict[str, dict[str, list[float]]] = {}
    with injector:
        for scores, control in in_workers(test_run, list(range(len(test))), s.workers):
            for arm, sc in scores:
                add(arms, arm, sc)
            add(refs, "another identity's hypernet prediction", control)
    timings["eval"] = time.time() - t0

    cis = {}
    for label, a, b in ((f"hypernet+{k} - zero+{long}", arms[f"hypernet+{k}"], arms[f"zero+{long}"]),
                        (f"hypernet+{k} - zero+{k}", arms[f"hypernet+{k}"], arms[f"zero+{k}"]),
                        ("hypernet+0 - base", arms["hypernet+0"], refs["base"]),
                        *([(f"hypernet-sub+{k} - zero+{long}", arms[f"hypernet-sub+{k}"], arms[f"zero+{long}"]),
                           (f"hypernet-sub+{k} - zero+{k}", arms[f"hypernet-sub+{k}"], arms[f"zero+{k}"]),
                           (f"hypernet-sub+{k} - mean-sub+{k}", arms[f"hypernet-sub+{k}"], arms[f"mean-sub+{k}"])]
                          if subspace is not None else []),
                        *([(f"{SUBSPACE_NET}+{k} - zero+{long}", arms[f"{SUBSPACE_NET}+{k}"], arms[f"zero+{long}"]),
                           (f"{SUBSPACE_NET}+{k} - zero+{k}", arms[f"{SUBSPACE_NET}+{k}"], arms[f"zero+{k}"]),
                           (f"{SUBSPACE_NET}+0 - hypernet+0", arms[f"{SUBSPACE_NET}+0"], arms["hypernet+0"]),
                           (f"{RELAXED}+{k} - zero+{long}", arms[f"{RELAXED}+{k}"], arms[f"zero+{long}"]),
                           (f"{RELAXED}+{k} - zero+{k}", arms[f"{RELAXED}+{k}"], arms[f"zero+{k}"]),
                           (f"{RELAXED}+{k} - {SUBSPACE_NET}+{k}", arms[f"{RELAXED}+{k}"],
                            arms[f"{SUBSPACE_NET}+{k}"])]
                          if SUBSPACE_NET in networks else []),
                        *([(f"hypernet+{k} - hypernet(s=1)+{k}", arms[f"hypernet+{k}"], arms[f"hypernet(s=1)+{k}"]),
                           ("hypernet+0 - hypernet(s=1)+0", arms["hypernet+0"], arms["hypernet(s=1)+0"])]
                          if s.single_pass_network else [])):
        for metric in ("cos", "rank1", "style", "styled_cos", "drift"):
            cis[f"{label} [{metric}]"] = bootstrap_ci([x - y for x, y in zip(a[metric], b[metric])], s.bootstrap,
                                                      s.seed)
    result.update(arms=arms, refs=refs, cis=cis, lrs={f"{a}+{p}": lr for (a, p), lr in chosen.items()},
                  val_cos={f"{a}+{p} lr {lr:g}": sum(v) / len(v) for (a, p, lr), v in val_cos.items()},
                  test=test, validation=val)
    return result
