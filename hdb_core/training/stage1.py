"""Stage 1: train the HyperNetwork on (face photo, stage-0 LiDB) pairs.

    loss = alpha * ||eps_theta_hat(x_t, t, c) - eps||^2  +  beta * ||theta_hat - theta||^2

The first term is the diffusion loss of the base model with the *predicted*
LiDB applied (per sample, through `training.injector`); the second pulls the
prediction towards the identity's pre-optimised LiDB (the paper's summed squared
L2). The two live on unrelated scales: summed over every number, the weight term's
gradient was thousands of times the diffusion term's, which made stage 1 plain
regression onto the stage-0 LiDBs. So the weight term is balanced at the predicted
weights: its gradient there is rescaled to `beta` times the diffusion gradient's
norm (beta 1: equal shares), whatever the model size; the raw ratio is logged.
Data flow: the photos are prepared once (`training.prepared`: face check, latents and
the frozen image encoder's features of each photo and its mirror), so a step runs no
VAE and no image encoder, and a `Samples` data loader reads one sample at a time from
the shards: memory does not grow with the dataset. A few identities are held out; their
loss (raw and EMA weights) is logged at every checkpoint next to the training loss.

Data-parallel under `accelerate launch`: the model is wrapped in DDP, each
process takes its slice of every global batch. Batches and random draws are a
pure function of (seed, step), so a run resumed from a checkpoint continues
exactly like an uninterrupted one.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from hdb_core import defaults
from hdb_core.errors import HDBError
from hdb_core.hypernet.file import save_hypernet
from hdb_core.hypernet.image_encoder import EncoderSpec, spec_from_hf_config
from hdb_core.hypernet.model import HyperNetConfig, HyperNetwork, LiDBPredictor
from hdb_core.hypernet.subspace_model import SubspaceHyperNetwork, SubspaceNetConfig
from hdb_core.lidb.file import load_lidb
from hdb_core.lidb.subspace import IdentitySubspace, row_width, rows_of
from hdb_core.lidb.targets import TEXT_ENCODERS, check_layers_match
from hdb_core.lidb.batch import LayerFactors, stack_train
from hdb_core.training.base_model import BaseModel, load_base_model, tokenize
from hdb_core.training.checkpoint import (load_checkpoint, load_optimizer_state, optimizer_state, prefixed,
                                          save_checkpoint)
from hdb_core.training.ema import EMA
from hdb_core.training.objective import PriorTerm, check_prior, draw
from hdb_core.training.prepared import PreparedData, PrepareSettings, is_prepared, prepare
from hdb_core.training.runtime import (LossLog, ProcessInfo, autocast, check_shared_options, loss_curve, resolve_dtype,
                                       state_dir)
from hdb_core.training.stage0 import lidb_path
from hdb_core.training.seeding import generator

log = logging.getLogger("hdb")


@dataclass
class HypernetSettings:
    trigger: str = defaults.TRIGGER
    prompt: str = "{trigger}"
    steps: int = defaults.STAGE1_STEPS
    batch_size: int = 4            # per process
    learning_rate: float = defaults.STAGE1_LR
    warmup_steps: int = 500
    weight_decay: float = 0.0
    alpha: float = 1.0             # diffusion reconstruction weight (0: weight regression only)
    beta: float = 1.0              # weight term's gradient norm relative to the diffusion term's
    weight_space: str = "factors"  # the weight term on the A/B factors (the paper) or on each layer's dW
    weight_length: str = "joint"   # "separate": the factor L2's gradient pulls the offset from the mean to the
                                   # target's length, however unsure its direction (see `unshrunk_weight_loss`)
    prior_weight: float = defaults.STAGE_PRIOR_WEIGHT   # the diffusion term's prior term for `class_prompt`
    class_prompt: str = defaults.CLASS_PROMPT     # (objective.PriorTerm; counted in the logged diffusion term)
    diffusion_photo: str = "input"  # the diffusion term's photo: the one the network sees (the paper) or
                                    # "other": another photo of the same person, so only identity carries over
    subspace_components: int = 0   # k > 0: the subspace hypernetwork (`SubspaceHyperNetwork`), which predicts
                                   # coordinates along the top k principal directions of the stage-0 LiDBs; 0: the
                                   # paper's transformer, which predicts every number
    input_photos: int = 1          # the network sees 1..input_photos photos of the person at once (one count
                                   # drawn per step), as `predict_lidb` and the nodes accept several
    grad_clip: float = 1.0
    resolution: int = defaults.RESOLUTION
    width: int = 512
    depth: int = 2
    heads: int = 8
    iterations: int = 4
    seed: int = 0
    flip: bool = defaults.MIRROR
    face_check: str = "detect"
    min_size: int = 128
    checkpoint_every: int = 500
    dtype: str = "auto"
    autocast: str = "auto"         # bf16 autocast of the forward: auto = on CUDA cards with bf16, off on CPU
    gradient_checkpointing: bool = False
    ema_decay: float = 0.999       # 0: no averaged weights
    val_identities: int = 32       # held out for validation (never more than a fifth of the identities)
    workers: int = -1              # data-loader worker processes; -1: 4 on CUDA, 0 on CPU

    def validate(self) -> None:
        check_shared_options(self)
        if self.steps < 1 or self.batch_size < 1:
            raise HDBError(f"steps ({self.steps}) and batch size ({self.batch_size}) must be at least 1.")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise HDBError(f"learning rate is {self.learning_rate}; use a positive value such as 1e-4.")
        if self.alpha < 0 or self.beta < 0 or self.alpha + self.beta == 0:
            raise HDBError(f"alpha ({self.alpha}) and beta ({self.beta}) must be >= 0 and not both 0.")
        if self.weight_space not in WEIGHT_SPACES:
            raise HDBError(f"weight space must be one of {', '.join(WEIGHT_SPACES)}, not {self.weight_space!r}.")
        if self.weight_length not in WEIGHT_LENGTHS:
            raise HDBError(f"weight length must be one of {', '.join(WEIGHT_LENGTHS)}, not {self.weight_length!r}.")
        if self.weight_length == "separate" and self.weight_space != "factors":
            raise HDBError("weight length 'separate' works on the A/B factors; use it with weight space 'factors'.")
        check_prior(self.prior_weight, self.class_prompt)   # with alpha 0 it is unused: it joins the diffusion term
        if self.diffusion_photo not in DIFFUSION_PHOTOS:
            raise HDBError(f"diffusion photo must be one of {', '.join(DIFFUSION_PHOTOS)}, "
                           f"not {self.diffusion_photo!r}.")
        if self.subspace_components < 0:
            raise HDBError(f"subspace components is {self.subspace_components}; use 0 (no subspace) or more, "
                           f"such as 128.")
        if self.input_photos < 1:
            raise HDBError(f"input photos is {self.input_photos}; use 1 (one photo per prediction) or more.")
        if not 0 <= self.ema_decay < 1:
            raise HDBError(f"EMA decay is {self.ema_decay}; use a value in [0, 1), such as 0.999 (0: no EMA).")
        if self.val_identities < 0:
            raise HDBError(f"held-out identities is {self.val_identities}; use 0 or more.")
        HyperNetConfig(self.width, self.depth, self.heads, self.iterations)

    def net_config(self) -> HyperNetConfig:
        return HyperNetConfig(width=self.width, depth=self.depth, heads=self.heads, iterations=self.iterations)

    def resume_key(self) -> dict:
        """Settings a resumed run must share with the checkpoint (the rest may change)."""
        d = asdict(self)
        for k in ("steps", "checkpoint_every", "min_size", "gradient_checkpointing", "workers"):
            d.pop(k)
        return d


def check_targets(ids: list[str], lidb_dir: str, base: BaseModel, keep_rows: bool = False):
    """(layers, LiDB config, (mean A, mean B), rows) of the identities' stage-0 LiDBs, read one at a time.

    Every LiDB must fit the base model and share one layout; nothing but the running sum is kept,
    and with `keep_rows` each LiDB as a row of `subspace.rows_of` [N, D] (for an identity subspace;
    else rows is None).
    """
    layers = config = rows = None
    sum_a = sum_b = None
    for i, ident in enumerate(ids):
        path = lidb_path(lidb_dir, ident)
        lidb = load_lidb(path)
        if layers is None:
            te = any(s.component in TEXT_ENCODERS for s in lidb.layers)
            check_layers_match(lidb.layers, base.layers(te), f"The stage-0 LiDBs in '{lidb_dir}'")
            if tuple(lidb.layers) != tuple(base.layers(te)):
                raise HDBError(f"The stage-0 LiDBs in '{lidb_dir}' cover {len(lidb.layers)} layers but the base "
                               f"model has {len(base.layers(te))}; pre-optimise them with this base model.")
            layers, config = lidb.layers, lidb.config
            rows = torch.empty(len(ids), row_width(layers, config)) if keep_rows else None
        elif lidb.layers != layers or lidb.config != config:
            raise HDBError(f"The stage-0 LiDB '{path}' was made with other layers or a/b/rank/seed than the others; "
                           f"pre-optimise all identities with the same settings.")
        if rows is not None:
            rows[i] = rows_of([lidb])[0]
        a, b = stack_train([lidb])
        sum_a = a if sum_a is None else {n: sum_a[n] + v for n, v in a.items()}
        sum_b = b if sum_b is None else {n: sum_b[n] + v for n, v in b.items()}
    mean = ({n: v[0] / len(ids) for n, v in sum_a.items()}, {n: v[0] / len(ids) for n, v in sum_b.items()})
    return layers, config, mean, rows


def _check_lidb_folder(lidb_dir: str, base: BaseModel) -> None:
    """Fail before any preparing or training when the stage-0 folder is missing, empty or for another model."""
    if not os.path.isdir(lidb_dir):
        raise HDBError(f"Stage-0 folder '{lidb_dir}' does not exist; run `hdb preoptimize` first and pass its "
                       f"output folder.")
    names = sorted(n for n in os.listdir(lidb_dir) if n.endswith(".safetensors"))
    if not names:
        raise HDBError(f"No identity has a stage-0 LiDB in '{lidb_dir}' (expected <identity>.safetensors); run "
                       f"`hdb preoptimize` on the same data.")
    check_targets([names[0][: -len(".safetensors")]], lidb_dir, base)


def _check_encoder(image_encoder, prepared_with: EncoderSpec, data_dir: str) -> None:
    """An encoder given with prepared data must be the one the features came from."""
    if isinstance(image_encoder, str):
        from transformers import CLIPVisionConfig

        try:
            spec = spec_from_hf_config(CLIPVisionConfig.from_pretrained(image_encoder, local_files_only=True))
        except (OSError, ValueError) as e:
            raise HDBError(f"Could not read the CLIP vision config in '{image_encoder}' ({e}); give a local folder "
                           f"with config.json, or leave --image-encoder out with prepared data.") from None
    else:
        spec = image_encoder.spec
    why = prepared_with.mismatch(spec)
    if why:
        raise HDBError(f"'{data_dir}' holds features of {prepared_with.name} ({prepared_with.summary()}), but the "
                       f"image encoder given {why}; pass the encoder it was prepared with, or leave it out.")


def split_held_out(ids: list[str], count: int, seed: int) -> tuple[list[str], list[str]]:
    """(training, held-out) identities: up to `count` held out, never more than a fifth, chosen by the seed."""
    k = min(count, len(ids) // 5)
    order = torch.randperm(len(ids), generator=generator(seed, "held-out")).tolist()
    held = {ids[i] for i in order[:k]}
    return [i for i in ids if i not in held], sorted(held)


class Samples(torch.utils.data.Dataset):
    """Sample `pos` of a run (global batch `pos // global_batch`): its identity, draws, features and target.

    Everything is read from the prepared shards and the stage-0 files when the sample is asked
    for, so memory does not grow with the dataset, and a sample depends only on (seed, pos):
    the same on any number of processes or loader workers, and after a resume.
    """

    def __init__(self, prepared: PreparedData, ids: list[str], lidb_dir: str, settings: HypernetSettings,
                 world: int, num_timesteps: int, latent_shape: tuple[int, ...]):
        self.prepared, self.ids, self.lidb_dir, self.s = prepared, ids, lidb_dir, settings
        self.global_batch = settings.batch_size * world
        self.num_timesteps, self.latent_shape = num_timesteps, latent_shape
        self._epoch: tuple[int, list[int]] = (-1, [])

    def __len__(self) -> int:
        return self.s.steps * self.global_batch

    def identity(self, pos: int) -> str:
        """Epochs of seeded permutations of the identities: a pure function of the position."""
        epoch, offset = divmod(pos, len(self.ids))
        if self._epoch[0] != epoch:
            self._epoch = (epoch, torch.randperm(len(self.ids), generator=generator(self.s.seed, "epoch",
                                                                                    epoch)).tolist())
        return self.ids[self._epoch[1][offset]]

    def __getitem__(self, pos: int) -> dict:
        step = pos // self.global_batch
        return self.sample(self.identity(pos), generator(self.s.seed, "stage1", step, pos), self.photo_count(step))

    def photo_count(self, step: int) -> int:
        """How many photos every sample of `step` shows the network (one count per step: equal memory lengths)."""
        if self.s.input_photos == 1:
            return 1
        return int(torch.randint(1, self.s.input_photos + 1, (1,), generator=generator(self.s.seed, "photos", step)))

    def sample(self, ident: str, gen: torch.Generator, count: int = 1) -> dict:
        photos = self.prepared.num_photos(ident)
        d = draw(gen, photos, self.s.flip, self.num_timesteps, self.latent_shape)
        target = d.photo
        if self.s.diffusion_photo == "other" and photos > 1:    # drawn last: the other draws stay as they were
            target = (d.photo + 1 + int(torch.randint(photos - 1, (1,), generator=gen))) % photos
        seen = [d.photo]
        if count > 1:    # the drawn photo, then the others in a drawn order (repeated when there are too few)
            others = [(d.photo + 1 + k) % photos for k in torch.randperm(photos - 1, generator=gen).tolist()]
            seen = [(seen + others)[k % photos] for k in range(count)]
        sample = {"features": torch.cat([self.prepared.features(ident, p, d.mirrored) for p in seen]),
                  "latents": self.prepared.latents(ident, target)[int(d.mirrored)],
                  "noise": d.noise, "timestep": d.timestep}
        if self.s.beta > 0:     # the weight term's target (beta 0: not read, which saves a file per sample)
            lidb = load_lidb(lidb_path(self.lidb_dir, ident))
            sample["a"] = {n: v.float() for n, v in lidb.a_train.items()}
            sample["b"] = {n: v.float() for n, v in lidb.b_train.items()}
        return sample

    def positions(self, step: int, rank: int = 0) -> list[int]:
        """This process's slice of the global batch of `step`."""
        first = step * self.global_batch + rank * self.s.batch_size
        return list(range(first, first + self.s.batch_size))

    def batch(self, step: int, rank: int = 0) -> dict:
        return collate([self[p] for p in self.positions(step, rank)])

    def held_out_batch(self, ids: list[str]) -> dict:
        """One fixed sample per held-out identity (the same draws at every validation)."""
        return collate([self.sample(i, generator(self.s.seed, "held-out", i)) for i in ids])


def collate(samples: list[dict]) -> dict:
    return torch.utils.data.default_collate(samples)


class StepBatches(torch.utils.data.Sampler):
    """The positions of this process's batches from step `start` on (a batch sampler for the DataLoader)."""

    def __init__(self, samples: Samples, start: int, rank: int):
        self.samples, self.start, self.rank = samples, start, rank

    def __iter__(self):
        for step in range(self.start, self.samples.s.steps):
            yield self.samples.positions(step, self.rank)

    def __len__(self) -> int:
        return self.samples.s.steps - self.start


def lr_factor(step: int, settings: HypernetSettings) -> float:
    """Linear warm-up, then cosine decay to 0 over the remaining steps."""
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    span = max(1, settings.steps - settings.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - settings.warmup_steps) / span)))


WEIGHT_SPACES = ("factors", "delta")
WEIGHT_LENGTHS = ("joint", "separate")
DIFFUSION_PHOTOS = ("input", "other")
# Settings whose default changed after they were added: a checkpoint older than the setting trained with
# this value, not with today's default (the prior term was off until it became stage 1's default).
SETTINGS_BEFORE_THEY_EXISTED = {"prior_weight": 0.0}


def weight_loss(a_hat, b_hat, a_t, b_t, names) -> torch.Tensor:
    """Per-sample ||theta_hat - theta||^2 summed over every number of the LiDB [B] (the paper's L2 term)."""
    total = 0.0
    for n in names:
        total = total + (a_hat[n] - a_t[n]).pow(2).flatten(1).sum(1) + (b_hat[n] - b_t[n]).pow(2).flatten(1).sum(1)
    return total


def unshrunk_weight_loss(a_hat, b_hat, a_t, b_t, mean, names) -> torch.Tensor:
    """The factor L2 of `weight_loss`, same value, with the gradient along the prediction's offset from
    the mean stage-0 LiDB pulling its length to the target offset's length.

    With o, o_t the offsets (all layers' A/B minus the mean), ||o - o_t||^2 = (|o| - |o_t|)^2 +
    2 |o| |o_t| (1 - cos). When one photo leaves the direction uncertain, plain L2 is lowest for a
    shorter o (the posterior mean), which identifies the person less (docs/evidence.md). Holding |o|
    constant in the second term leaves the value unchanged and lets only the first set the length.
    """
    mean_a, mean_b = mean

    def offset(a, b):
        return torch.cat([(a[n] - mean_a[n]).flatten(1) for n in names]
                         + [(b[n] - mean_b[n]).flatten(1) for n in names], 1)

    o, o_t = offset(a_hat, b_hat), offset(a_t, b_t)
    length, length_t = o.norm(dim=1), o_t.norm(dim=1)
    cos = torch.nn.functional.cosine_similarity(o, o_t, dim=1, eps=1e-12)
    return (length - length_t).pow(2) + 2 * length.detach() * length_t * (1 - cos)


def delta_weight_loss(predicted, target, names) -> torch.Tensor:
    """Per-sample sum over layers of ||dW_hat - dW||_F^2 [B] from {name: (down, up)} factors
    (`LayerFactors`): blind to the A/B factors' gauge.

    A/B are only defined up to A -> A c, B -> B / c (and rotations for rank > 1); dW is not.
    With U = [up_hat, -up] and D = [down_hat; down], ||U D||^2 = sum((U^T U) * (D D^T)),
    so no [out, in] matrix is ever formed.
    """
    total = 0.0
    for n in names:
        (d1, u1), (d2, u2) = predicted[n], target[n]
        u, d = torch.cat([u1, -u2], -1), torch.cat([d1, d2], -2)
        total = total + ((u.transpose(-1, -2) @ u) * (d @ d.transpose(-1, -2))).sum((-1, -2))
    return total


def new_hypernet(settings: HypernetSettings, layers, config, encoder_spec, base_name: str,
                 mean: tuple[dict, dict] | None = None, subspace: IdentitySubspace | None = None,
                 feature_stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> LiDBPredictor:
    """The untrained network; seeded, so every process starts from identical weights.

    With the mean stage-0 LiDB (A, B) of the training identities, it predicts that mean from
    the start and learns each identity's offset from it. With `settings.subspace_components`:
    the subspace hypernetwork of `subspace`, its input standardised by `feature_stats`.
    """
    torch.manual_seed(settings.seed)
    if settings.subspace_components:
        net = SubspaceHyperNetwork(SubspaceNetConfig(subspace.components), layers, config, encoder_spec)
        net.set_subspace(subspace)
        net.set_feature_statistics(*feature_stats)
    else:
        net = HyperNetwork(settings.net_config(), layers, config, encoder_spec)
        if mean is not None:
            net.set_offset(*mean)
    net.base_model = base_name
    return net


def feature_statistics(prepared: PreparedData, ids: list[str], mirrored: bool,
                       limit: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and spread [T, hidden] of the image features of (at most `limit` of) these identities' photos."""
    total = squares = None
    count = 0
    for ident in ids:
        for photo in range(prepared.num_photos(ident)):
            for flip in (False, True) if mirrored else (False,):
                f = prepared.features(ident, photo, flip).double()
                total = f if total is None else total + f
                squares = f * f if squares is None else squares + f * f
                count += 1
        if count >= limit:
            break
    mean = total / count
    spread = (squares / count - mean * mean).clamp_min(0).sqrt()
    return mean.float(), spread.float()


@dataclass
class Terms:
    """One process's share of a step: per-sample losses and the predictions they depend on."""

    diffusion: torch.Tensor                 # [B]
    weight: torch.Tensor                    # [B], the summed squared error to the stage-0 LiDB
    predicted: list[torch.Tensor]           # every predicted A/B tensor (the heads' outputs)


class Objective:
    """alpha * diffusion + beta * weight-L2 of one process's share of a step's global batch.

    Use as a context manager (it hooks the base model's projections while open). `terms`
    computes the losses; `backward` balances them at the predicted weights (see the module
    doc) and back-propagates once through the UNet and once through the hypernetwork.
    """

    def __init__(self, layers, config, base: BaseModel, settings: HypernetSettings, device, dtype,
                 mean: tuple[dict, dict] | None = None):
        self.base, self.s, self.device, self.dtype = base, settings, device, dtype
        # the mean stage-0 LiDB (A, B), the point offsets are measured from (weight_length "separate")
        self.mean = None if mean is None else tuple({n: v.to(device) for n, v in m.items()} for m in mean)
        self.layers = layers
        self.names = [s.name for s in self.layers]
        self.injector = base.injector(self.layers, "The stage-0 LiDBs")
        self.factors = LayerFactors(config, self.layers, device)
        prompt = settings.prompt.format(trigger=settings.trigger)
        self.input_ids = tokenize(base, [prompt], device)
        self.prior = (PriorTerm(base, self.injector, tokenize(base, [settings.class_prompt], device), per_sample=True)
                      if settings.prior_weight and settings.alpha > 0 else None)

    def __enter__(self) -> "Objective":
        self.injector.attach()
        return self

    def __exit__(self, *exc) -> None:
        self.injector.remove()

    def terms(self, net, batch: dict) -> Terms:
        """The losses of one batch from `Samples` (features, latents, noise, timestep, stage-0 a/b)."""
        device, base = self.device, self.base
        a_hat, b_hat = net(batch["features"].to(device, non_blocking=True))
        delta = self.s.weight_space == "delta"
        predicted = self.factors.named(a_hat, b_hat) if delta or self.s.alpha > 0 else None
        w_loss = self._weight_term(a_hat, b_hat, predicted, batch)
        if self.s.alpha > 0:
            x0, noise, t = (batch[k].to(device) for k in ("latents", "noise", "timestep"))
            prior = self.prior(predicted, x0, noise, t, self.dtype) if self.prior is not None else 0.0
            self.injector.set_factors(predicted)
            context = base.text_encoder(self.input_ids.expand(len(w_loss), -1))[0]
            # The factors stay set until the next batch: gradient checkpointing reruns the UNet's
            # forward during the backward pass, which must see the same residuals.
            d_loss = base.loss(x0, noise, t, context, self.dtype) + self.s.prior_weight * prior
        else:
            d_loss = torch.zeros_like(w_loss)
        return Terms(d_loss, w_loss, [*a_hat.values(), *b_hat.values()])

    def _weight_term(self, a_hat, b_hat, predicted, batch: dict) -> torch.Tensor:
        """[B] squared distance to the stage-0 LiDBs; zeros with beta 0 (no target was read: `Samples.sample`)."""
        if self.s.beta == 0:
            return torch.zeros(len(batch["timestep"]), device=self.device)
        a_t = {n: v.to(self.device, non_blocking=True) for n, v in batch["a"].items()}
        b_t = {n: v.to(self.device, non_blocking=True) for n, v in batch["b"].items()}
        if self.s.weight_space == "delta":
            return delta_weight_loss(predicted, self.factors.named(a_t, b_t), self.names)
        if self.s.weight_length == "separate":
            return unshrunk_weight_loss(a_hat, b_hat, a_t, b_t, self.mean, self.names)
        return weight_loss(a_hat, b_hat, a_t, b_t, self.names)

    def value(self, terms: Terms) -> torch.Tensor:
        """alpha * diffusion + beta * weight, unbalanced: the number the loss log shows."""
        return self.s.alpha * terms.diffusion.mean() + self.s.beta * terms.weight.mean()

    def backward(self, terms: Terms) -> dict[str, float]:
        """Gradients of the balanced loss into the network; returns the gradient norms at the predictions."""
        outputs = terms.predicted
        if self.s.beta == 0:        # the diffusion term alone (alpha > 0 then)
            g_d = torch.autograd.grad(self.s.alpha * terms.diffusion.mean(), outputs, retain_graph=True)
            torch.autograd.backward(outputs, g_d)
            return {"diffusion_grad": _global_norms(g_d)[0], "weight_grad": 0.0, "raw_ratio": 0.0}
        g_w = torch.autograd.grad(terms.weight.mean(), outputs, retain_graph=True)
        if self.s.alpha > 0:
            g_d = torch.autograd.grad(self.s.alpha * terms.diffusion.mean(), outputs, retain_graph=True)
            norm_w, norm_d = _global_norms(g_w, g_d)
            scale = self.s.beta * norm_d / norm_w if norm_w > 0 and norm_d > 0 else self.s.beta
        else:
            g_d, norm_d, scale = [torch.zeros_like(o) for o in outputs], 0.0, self.s.beta
            norm_w = _global_norms(g_w)[0]
        torch.autograd.backward(outputs, [d + scale * w for d, w in zip(g_d, g_w)])
        return {"diffusion_grad": norm_d, "weight_grad": norm_w * scale,
                "raw_ratio": norm_w / norm_d if norm_d > 0 else float("inf")}


def _global_norms(*grads) -> list[float]:
    """The norm of each gradient list over the whole global batch, the same on every process.

    Each process holds its share of the predictions, so the squared norms are summed over
    processes: the balancing scale, a ratio of two such norms, is then exactly that of one
    process with the whole batch (the 1/N of every process's mean cancels in the ratio).
    """
    squares = torch.stack([sum(g.float().pow(2).sum() for g in gs) for gs in grads])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(squares)
    return squares.sqrt().tolist()


def ema_path(output: str) -> str:
    """Where the averaged weights go: `hypernet.safetensors` -> `hypernet.ema.safetensors` (same format)."""
    return output[: -len(".safetensors")] + ".ema.safetensors"


@torch.no_grad()
def held_out_loss(objective: Objective, net, batch: dict, settings: HypernetSettings, device) -> list[float]:
    """[loss, diffusion, weight] of the held-out identities' fixed samples, in chunks of the batch size."""
    n = len(batch["timestep"])
    sums = torch.zeros(3)
    for lo in range(0, n, settings.batch_size):
        part = {k: ({n_: v[lo:lo + settings.batch_size] for n_, v in x.items()} if isinstance(x, dict)
                    else x[lo:lo + settings.batch_size]) for k, x in batch.items()}
        with autocast(settings.autocast, device):
            terms = objective.terms(net, part)
        k = len(part["timestep"])
        sums += k * torch.tensor([float(objective.value(terms)), float(terms.diffusion.mean()),
                                  float(terms.weight.mean())])
    return (sums / n).tolist()


def train_hypernet(data_dir: str, lidb_dir: str, base_model: str | BaseModel, image_encoder, output: str,
                   settings: HypernetSettings, base_config: str | None = None, accelerator=None,
                   progress: bool = True, on_step: Callable[[dict], None] | None = None) -> dict:
    """Train (or resume) a hypernetwork and write it (and its EMA twin) to `output`; returns a summary dict.

    `data_dir` is a folder made by `hdb prepare`, or a face folder, which is then prepared first
    into `<output>.state/prepared` with `image_encoder` (a local CLIP vision folder or an
    `image_encoder.ClipImageEncoder`). Checkpoints and the loss logs go to `<output>.state/`.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    started = time.time()
    settings.validate()
    if not output.endswith(".safetensors"):
        raise HDBError(f"The hypernetwork output '{output}' must end in .safetensors.")
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    device = accelerator.device
    dtype = resolve_dtype(settings.dtype, device)
    base = base_model if isinstance(base_model, BaseModel) else load_base_model(base_model, base_config)
    state = state_dir(output)
    world, rank = accelerator.num_processes, accelerator.process_index
    main = accelerator.is_main_process
    _check_lidb_folder(lidb_dir, base)
    if not is_prepared(data_dir):
        if image_encoder is None:
            raise HDBError(f"'{data_dir}' is a face folder, not a prepared one: pass --image-encoder so it can be "
                           f"prepared first, or run `hdb prepare` and pass its output as --data.")
        faces, data_dir = data_dir, os.path.join(state, "prepared")
        prepare(faces, base, image_encoder, data_dir, PrepareSettings(settings.resolution, settings.face_check,
                                                             settings.min_size, dtype=settings.dtype),
                process=ProcessInfo(rank, world, device), progress=progress)
    elif image_encoder is not None:
        _check_encoder(image_encoder, PreparedData(data_dir).encoder, data_dir)
    prepared = PreparedData(data_dir)
    settings = prepared.applied_to(settings)
    with_lidb = [i for i in prepared.ids if os.path.exists(lidb_path(lidb_dir, i))]
    if not with_lidb:
        raise HDBError(f"None of the {len(prepared.ids)} identities has a stage-0 LiDB in '{lidb_dir}' (expected "
                       f"<identity>.safetensors); run `hdb preoptimize` on the same data.")
    if len(with_lidb) < len(prepared.ids) and main:
        log.warning("%d identities have no stage-0 LiDB yet and are left out", len(prepared.ids) - len(with_lidb))
    train_ids, held_out = split_held_out(with_lidb, settings.val_identities, settings.seed)
    layers, config, mean, rows = check_targets(train_ids, lidb_dir, base, keep_rows=settings.subspace_components > 0)
    if held_out and check_targets(held_out, lidb_dir, base)[:2] != (layers, config):
        raise HDBError(f"The stage-0 LiDBs in '{lidb_dir}' were made with different settings; pre-optimise all "
                       f"identities with the same settings.")
    base.to(device, dtype)

    subspace = statistics = None
    if settings.subspace_components:
        subspace = IdentitySubspace.fit_rows(rows, layers, config, settings.subspace_components)
        statistics = feature_statistics(prepared, train_ids, settings.flip)
    net = new_hypernet(settings, layers, config, prepared.encoder, base.name, mean, subspace, statistics)
    optimizer = torch.optim.AdamW(net.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    ema = EMA(net, settings.ema_decay) if settings.ema_decay > 0 else None
    ckpt_path = os.path.join(state, "checkpoint.safetensors")
    start = 0
    found = load_checkpoint(ckpt_path)
    if found is not None:
        tensors, st = found
        # a checkpoint from before a setting existed was written with that setting's default then
        saved = {**HypernetSettings().resume_key(), **SETTINGS_BEFORE_THEY_EXISTED, **st["settings"]}
        now = settings.resume_key()
        if saved != now:
            changed = "; ".join(f"{k}: {saved[k]!r} there, {now.get(k)!r} now" for k in sorted(saved)
                                if saved[k] != now.get(k))
            raise HDBError(f"The checkpoint in '{state}' was written with other settings ({changed}); "
                           f"use the same settings to resume, or delete that folder to start again.")
        net.load_state_dict(prefixed(tensors, "net"))
        load_optimizer_state(optimizer, tensors, st["optimizer"])
        if ema is not None:
            ema.shadow = prefixed(tensors, "ema")
        start = st["step"]
        if main:
            log.info("resuming stage 1 from step %d", start)
    net, optimizer = accelerator.prepare(net, optimizer)
    raw = accelerator.unwrap_model(net)

    loss_log = val_log = None
    if main:
        loss_log = LossLog(os.path.join(state, "loss.csv"),
                           ["step", "loss", "diffusion", "weight", "lr", "weight_to_diffusion_grad"])
        loss_log.keep(lambda r: int(r["step"]) <= start)
        if held_out:
            val_log = LossLog(os.path.join(state, "validation.csv"), VALIDATION_COLUMNS)
            val_log.keep(lambda r: int(r["step"]) <= start)
    side = prepared.resolution // 8
    samples = Samples(prepared, train_ids, lidb_dir, settings, world, base.num_timesteps,
                      (int(base.vae.config.latent_channels), side, side))
    workers = settings.workers if settings.workers >= 0 else (4 if device.type == "cuda" else 0)
    loader = torch.utils.data.DataLoader(samples, batch_sampler=StepBatches(samples, start, rank),
                                         num_workers=workers, pin_memory=device.type == "cuda")
    held_batch = samples.held_out_batch(held_out) if held_out and main else None
    objective = Objective(layers, config, base, settings, device, dtype, mean)
    bar = tqdm(total=settings.steps, initial=start, disable=not (progress and main),
               desc="stage 1", unit="step", dynamic_ncols=True)
    net.train()
    with objective, base.checkpointing(settings.gradient_checkpointing):
        for step, batch in zip(range(start, settings.steps), loader):
            with autocast(settings.autocast, device):
                terms = objective.terms(net, batch)
            optimizer.zero_grad(set_to_none=True)
            lr = settings.learning_rate * lr_factor(step, settings)
            for group in optimizer.param_groups:
                group["lr"] = lr    # set from the step, so a resumed run needs no scheduler state
            norms = objective.backward(terms)
            if settings.grad_clip > 0:
                accelerator.clip_grad_norm_(net.parameters(), settings.grad_clip)
            optimizer.step()
            if ema is not None:
                ema.update(raw, step)
            raw_ratio = norms["raw_ratio"] if math.isfinite(norms["raw_ratio"]) else 0.0
            with torch.no_grad():
                values = [float(objective.value(terms)), float(terms.diffusion.mean()), float(terms.weight.mean())]
            logged = accelerator.reduce(torch.tensor([*values, raw_ratio], device=device), "mean").tolist()
            if not math.isfinite(logged[0]):
                raise HDBError(f"The stage-1 loss became {logged[0]} at step {step + 1}; lower the learning rate "
                               f"(now {settings.learning_rate:g}) or use --dtype fp32.")
            if loss_log is not None:
                loss_log.append(step + 1, *(f"{v:.6g}" for v in logged[:3]), f"{lr:.3g}", f"{logged[3]:.4g}")
            bar.update(1)
            bar.set_postfix(loss=f"{logged[0]:.4f}")
            done = step + 1
            if done % settings.checkpoint_every == 0 or done == settings.steps:
                if main:
                    _validate_and_plot(objective, raw, ema, held_batch, val_log, loss_log, done, settings, device)
                # Also at the end: the same command run again then finds nothing left to do.
                _checkpoint(accelerator, ckpt_path, raw, optimizer, ema, done, settings)
            if on_step is not None:
                on_step({"step": done, "loss": logged[0], "diffusion": logged[1], "weight": logged[2], "net": raw,
                         "rank": rank})
    bar.close()
    accelerator.wait_for_everyone()
    summary = {"steps": settings.steps, "identities": len(train_ids), "held_out": len(held_out),
               "skipped": _skipped(prepared), "output": output, "state_dir": state,
               "ema_output": ema_path(output) if ema is not None else None}
    if main:
        raw.info = {"trained_with": "hdb train-hypernet", "identities": str(len(train_ids)),
                    "held_out": str(len(held_out)), "steps": str(settings.steps), "alpha": str(settings.alpha),
                    "beta": str(settings.beta), "trigger": settings.trigger,
                    **({"subspace_components": str(settings.subspace_components)}
                       if settings.subspace_components else {}),
                    "prompt": settings.prompt.format(trigger=settings.trigger)}
        save_hypernet(raw, output)
        if ema is not None:
            averaged = ema.averaged(raw)
            averaged.info = {**raw.info, "weights": f"EMA, decay {settings.ema_decay:g}"}
            save_hypernet(averaged, ema_path(output))
    accelerator.wait_for_everyone()
    summary["seconds"] = round(time.time() - started, 1)
    return summary


VALIDATION_COLUMNS = ["step", "loss", "diffusion", "weight", "ema_loss", "ema_diffusion", "ema_weight"]


def _skipped(prepared: PreparedData) -> str:
    counts = prepared.skip_counts
    if not counts:
        return "no images skipped"
    return f"{sum(counts.values())} skipped ({', '.join(f'{n} {why}' for why, n in sorted(counts.items()))})"


def _validate_and_plot(objective, raw, ema, held_batch, val_log, loss_log, step, settings, device) -> None:
    """Held-out loss of the raw and averaged weights into validation.csv, and loss.png redrawn."""
    from hdb_core.plots import save_loss_png

    validation = {}
    if held_batch is not None:
        values = held_out_loss(objective, raw, held_batch, settings, device)
        ema_values = held_out_loss(objective, ema.averaged(raw), held_batch, settings, device) if ema else [""] * 3
        val_log.append(step, *(f"{v:.6g}" if v != "" else v for v in (*values, *ema_values)))
        rows = val_log.rows()
        validation["held-out"] = [(int(r["step"]), float(r["loss"])) for r in rows]
        if ema is not None:
            validation["held-out, EMA"] = [(int(r["step"]), float(r["ema_loss"])) for r in rows]
    save_loss_png(loss_curve(loss_log.path), "stage 1: loss per step",
                  os.path.join(os.path.dirname(loss_log.path), "loss.png"), validation)


def _checkpoint(accelerator, path, raw, optimizer, ema, step, settings) -> None:
    if accelerator.is_main_process:
        tensors, opt_meta = optimizer_state(optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer)
        tensors.update({f"net.{k}": v for k, v in raw.state_dict().items()})
        if ema is not None:
            tensors.update({f"ema.{k}": v for k, v in ema.shadow.items()})
        save_checkpoint(path, tensors, {"step": step, "optimizer": opt_meta, "settings": settings.resume_key()})
    accelerator.wait_for_everyone()
