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
The CLIP vision encoder is frozen. Every usable photo of an identity is trained
on; a photo that fails the checks is skipped up front, the same way on every process.

Data-parallel under `accelerate launch`: the model is wrapped in DDP, each
process takes its slice of every global batch. Batches and random draws are a
pure function of (seed, step), so a run resumed from a checkpoint continues
exactly like an uninterrupted one.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from hdb_core import defaults
from hdb_core.errors import HDBError
from hdb_core.hypernet.file import save_hypernet
from hdb_core.hypernet.model import HyperNetConfig, HyperNetwork
from hdb_core.lidb.file import load_lidb
from hdb_core.lidb.targets import TEXT_ENCODERS, check_layers_match
from hdb_core.lidb.batch import stack_train, train_factors
from hdb_core.lidb.weights import LiDB, aux_for_layers
from hdb_core.training import data
from hdb_core.training.base_model import BaseModel, load_base_model, photo_latents, tokenize
from hdb_core.training.checkpoint import (load_checkpoint, load_optimizer_state, optimizer_state, prefixed,
                                          save_checkpoint)
from hdb_core.training.objective import draw
from hdb_core.training.runtime import DTYPES, LossLog, resolve_dtype, state_dir
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

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise HDBError(f"steps ({self.steps}) and batch size ({self.batch_size}) must be at least 1.")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise HDBError(f"learning rate is {self.learning_rate}; use a positive value such as 1e-4.")
        if self.alpha < 0 or self.beta < 0 or self.alpha + self.beta == 0:
            raise HDBError(f"alpha ({self.alpha}) and beta ({self.beta}) must be >= 0 and not both 0.")
        if self.resolution < 64 or self.resolution % 64:
            raise HDBError(f"resolution {self.resolution} is not a multiple of 64 (at least 64); use 512 for SD1.5.")
        if self.checkpoint_every < 1:
            raise HDBError(f"checkpoint interval is {self.checkpoint_every}; use 1 or more steps.")
        if self.face_check not in data.FACE_CHECKS:
            raise HDBError(f"face check must be one of {', '.join(data.FACE_CHECKS)}, not {self.face_check!r}.")
        if self.dtype not in DTYPES:
            raise HDBError(f"dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}.")
        HyperNetConfig(self.width, self.depth, self.heads, self.iterations)

    def net_config(self) -> HyperNetConfig:
        return HyperNetConfig(width=self.width, depth=self.depth, heads=self.heads, iterations=self.iterations)

    def resume_key(self) -> dict:
        """Settings a resumed run must share with the checkpoint (the rest may change)."""
        d = asdict(self)
        for k in ("steps", "checkpoint_every", "min_size"):
            d.pop(k)
        return d


@dataclass(frozen=True)
class Pair:
    id: str
    images: tuple[str, ...]     # the identity's usable photos
    lidb: LiDB


def usable_photos(paths, resolution: int, face_check: str, skips: data.Skips) -> tuple[str, ...]:
    """The photos that pass loading and the face check (the others are skipped with their reason)."""
    usable = []
    for path in paths:
        try:
            data.prepare_image(path, resolution, face_check)
            usable.append(path)
        except ValueError as e:
            skips.add(path, str(e))
    return tuple(usable)


def find_pairs(data_dir: str, lidb_dir: str, base: BaseModel, min_size: int, skips: data.Skips,
               resolution: int | None = None, face_check: str = "none") -> list[Pair]:
    """(usable photos, stage-0 LiDB) per identity; clear errors when the folders do not fit the base model.

    With a resolution, every photo is checked up front, so all processes agree on the list
    and training never meets a bad photo; identities left without a usable photo are dropped.
    """
    identities = data.scan(data_dir, min_size, skips)
    if not os.path.isdir(lidb_dir):
        raise HDBError(f"Stage-0 folder '{lidb_dir}' does not exist; run `hdb preoptimize` first and pass its "
                       f"output folder.")
    layers = None
    pairs = []
    missing = 0
    for ident in identities:
        path = os.path.join(lidb_dir, f"{ident.id}.safetensors")
        if not os.path.exists(path):
            missing += 1
            continue
        lidb = load_lidb(path)
        if layers is None:
            te = any(s.component in TEXT_ENCODERS for s in lidb.layers)
            check_layers_match(lidb.layers, base.layers(te), f"The stage-0 LiDBs in '{lidb_dir}'")
            if tuple(lidb.layers) != tuple(base.layers(te)):
                raise HDBError(f"The stage-0 LiDBs in '{lidb_dir}' cover {len(lidb.layers)} layers but the base "
                               f"model has {len(base.layers(te))}; pre-optimise them with this base model.")
            layers, config = lidb.layers, lidb.config
        elif lidb.layers != layers or lidb.config != config:
            raise HDBError(f"The stage-0 LiDB '{path}' was made with other layers or a/b/rank/seed than the others; "
                           f"pre-optimise all identities with the same settings.")
        photos = usable_photos(ident.paths, resolution, face_check, skips) if resolution else ident.paths
        if not photos:
            skips.add(ident.id, "identity without usable photos")
            continue
        pairs.append(Pair(ident.id, tuple(photos), lidb))
    if not pairs:
        raise HDBError(f"None of the {len(identities)} identities in '{data_dir}' has a stage-0 LiDB in "
                       f"'{lidb_dir}' (expected <identity>.safetensors); run `hdb preoptimize` on the same data.")
    if missing:
        log.warning("%d identities have no stage-0 LiDB yet and are left out", missing)
    return pairs


def batch_indices(step: int, n: int, global_batch: int, seed: int) -> list[int]:
    """Dataset indices of the global batch of `step`: epochs of seeded permutations, a pure function of step."""
    out = []
    for pos in range(step * global_batch, (step + 1) * global_batch):
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=generator(seed, "epoch", epoch))
        out.append(int(perm[offset]))
    return out


def lr_factor(step: int, settings: HypernetSettings) -> float:
    """Linear warm-up, then cosine decay to 0 over the remaining steps."""
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    span = max(1, settings.steps - settings.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - settings.warmup_steps) / span)))


def weight_loss(a_hat, b_hat, a_t, b_t, names) -> torch.Tensor:
    """Per-sample ||theta_hat - theta||^2 summed over every number of the LiDB [B] (the paper's L2 term)."""
    total = 0.0
    for n in names:
        total = total + (a_hat[n] - a_t[n]).pow(2).flatten(1).sum(1) + (b_hat[n] - b_t[n]).pow(2).flatten(1).sum(1)
    return total


class _Samples:
    """Loads photos, caches their latents, and draws the per-sample photo, mirror, timestep and noise."""

    def __init__(self, pairs, base, encoder, settings, device):
        self.pairs, self.base, self.encoder = pairs, base, encoder
        self.s, self.device = settings, device
        self.images: dict[tuple[int, int], torch.Tensor] = {}
        self.latents: dict[tuple[int, int], torch.Tensor] = {}

    def photo(self, i: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Identity i's photo k [H, W, 3] and its latents [2, C, h, w] (index 1: mirrored)."""
        if (i, k) not in self.images:
            path = self.pairs[i].images[k]
            try:
                img = data.prepare_image(path, self.s.resolution, self.s.face_check)
            except ValueError as e:     # it passed the up-front check: the file changed since
                raise HDBError(f"The photo {path} of identity '{self.pairs[i].id}' cannot be used any more "
                               f"({e}); restore it or remove it, then resume.") from None
            self.images[i, k] = img
            self.latents[i, k] = photo_latents(self.base, img[None], self.device, self.s.flip)[0].cpu()
        return self.images[i, k], self.latents[i, k]

    def batch(self, indices: list[int], positions: list[int], step: int):
        imgs, lat, noise, ts = [], [], [], []
        side = self.s.resolution // 8
        shape = (int(self.base.vae.config.latent_channels), side, side)
        for i, pos in zip(indices, positions):
            d = draw(generator(self.s.seed, "stage1", step, pos), len(self.pairs[i].images), self.s.flip,
                     self.base.num_timesteps, shape)
            img, latents = self.photo(i, d.photo)
            imgs.append(img.flip(1) if d.mirrored else img)
            lat.append(latents[1 if d.mirrored else 0])
            noise.append(d.noise)
            ts.append(d.timestep)
        return torch.stack(imgs), torch.stack(lat), torch.stack(noise), torch.tensor(ts, dtype=torch.long)


def new_hypernet(settings: HypernetSettings, layers, config, encoder_spec, base_name: str,
                 pairs: list[Pair] | None = None) -> HyperNetwork:
    """The untrained network; seeded, so every process starts from identical weights.

    With the training pairs, it predicts their mean stage-0 LiDB from the start and learns
    each identity's offset from it.
    """
    torch.manual_seed(settings.seed)
    net = HyperNetwork(settings.net_config(), layers, config, encoder_spec)
    net.base_model = base_name
    if pairs:
        a, b = stack_train([p.lidb for p in pairs])
        net.set_offset({n: v.mean(0) for n, v in a.items()}, {n: v.mean(0) for n, v in b.items()})
    return net


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

    def __init__(self, pairs, base: BaseModel, encoder, settings: HypernetSettings, device, dtype):
        self.pairs, self.base, self.encoder = pairs, base, encoder
        self.s, self.device, self.dtype = settings, device, dtype
        self.layers, config = pairs[0].lidb.layers, pairs[0].lidb.config
        self.names = [s.name for s in self.layers]
        self.injector = base.injector(self.layers, "The stage-0 LiDBs")
        self.aux = {n: (a.to(device), b.to(device)) for n, (a, b) in aux_for_layers(config, self.layers).items()}
        self.samples = _Samples(pairs, base, encoder, settings, device)
        prompt = settings.prompt.format(trigger=settings.trigger)
        self.input_ids = tokenize(base, [prompt] * settings.batch_size, device)

    def __enter__(self) -> "Objective":
        self.injector.attach()
        return self

    def __exit__(self, *exc) -> None:
        self.injector.remove()

    def terms(self, net, step: int, rank: int = 0, world: int = 1) -> Terms:
        """Batches and draws depend only on (seed, step, rank)."""
        s, device, base = self.s, self.device, self.base
        global_batch = s.batch_size * world
        idx = batch_indices(step, len(self.pairs), global_batch, s.seed)
        positions = list(range(step * global_batch, (step + 1) * global_batch))
        lo, hi = rank * s.batch_size, (rank + 1) * s.batch_size
        mine = idx[lo:hi]
        images, lat, noise, ts = self.samples.batch(mine, positions[lo:hi], step)
        a_hat, b_hat = net(self.encoder.encode(images))
        a_t, b_t = stack_train([self.pairs[i].lidb for i in mine], device)
        w_loss = weight_loss(a_hat, b_hat, a_t, b_t, self.names)
        if s.alpha > 0:
            self.injector.set_factors(train_factors(self.aux, a_hat, b_hat))
            context = base.text_encoder(self.input_ids)[0]
            d_loss = base.loss(lat.to(device), noise.to(device), ts.to(device), context, self.dtype)
            self.injector.clear()
        else:
            d_loss = torch.zeros_like(w_loss)
        return Terms(d_loss, w_loss, [*a_hat.values(), *b_hat.values()])

    def value(self, terms: Terms) -> torch.Tensor:
        """alpha * diffusion + beta * weight, unbalanced: the number the loss log shows."""
        return self.s.alpha * terms.diffusion.mean() + self.s.beta * terms.weight.mean()

    def backward(self, terms: Terms) -> dict[str, float]:
        """Gradients of the balanced loss into the network; returns the gradient norms at the predictions."""
        outputs = terms.predicted
        g_w = torch.autograd.grad(terms.weight.mean(), outputs, retain_graph=True)
        norm_w = _norm(g_w)
        if self.s.alpha > 0:
            g_d = torch.autograd.grad(self.s.alpha * terms.diffusion.mean(), outputs, retain_graph=True)
            norm_d = _norm(g_d)
            scale = self.s.beta * norm_d / norm_w if norm_w > 0 and norm_d > 0 else self.s.beta
        else:
            g_d, norm_d, scale = [torch.zeros_like(o) for o in outputs], 0.0, self.s.beta
        torch.autograd.backward(outputs, [d + scale * w for d, w in zip(g_d, g_w)])
        return {"diffusion_grad": norm_d, "weight_grad": norm_w * scale,
                "raw_ratio": norm_w / norm_d if norm_d > 0 else float("inf")}


def _norm(grads) -> float:
    return float(torch.sqrt(sum(g.float().pow(2).sum() for g in grads)))


def train_hypernet(data_dir: str, lidb_dir: str, base_model: str | BaseModel, image_encoder, output: str,
                   settings: HypernetSettings, base_config: str | None = None, accelerator=None,
                   progress: bool = True, on_step: Callable[[dict], None] | None = None) -> dict:
    """Train (or resume) a hypernetwork and write it to `output`; returns a summary dict.

    `image_encoder` is a local CLIP vision folder or an `image_encoder.ClipImageEncoder`.
    Checkpoints and the loss log go to `<output>.state/`.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from hdb_core.hypernet.image_encoder import ClipImageEncoder

    settings.validate()
    if not output.endswith(".safetensors"):
        raise HDBError(f"The hypernetwork output '{output}' must end in .safetensors.")
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    device = accelerator.device
    dtype = resolve_dtype(settings.dtype, device)
    skips = data.Skips()
    base = base_model if isinstance(base_model, BaseModel) else load_base_model(base_model, base_config)
    pairs = find_pairs(data_dir, lidb_dir, base, settings.min_size, skips, settings.resolution, settings.face_check)
    if isinstance(image_encoder, str):
        if not os.path.exists(image_encoder):
            raise HDBError(f"Image encoder '{image_encoder}' does not exist; pass --image-encoder with a local CLIP "
                           f"vision folder (config.json + model.safetensors) - nothing is downloaded.")
        image_encoder = ClipImageEncoder.from_pretrained(image_encoder, device=device)
    else:
        image_encoder.model.to(device)
    base.to(device, dtype)
    layers, config = pairs[0].lidb.layers, pairs[0].lidb.config

    net = new_hypernet(settings, layers, config, image_encoder.spec, base.name, pairs)
    optimizer = torch.optim.AdamW(net.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    state = state_dir(output)
    ckpt_path = os.path.join(state, "checkpoint.safetensors")
    start = 0
    found = load_checkpoint(ckpt_path)
    if found is not None:
        tensors, st = found
        if st["settings"] != settings.resume_key():
            changed = sorted(k for k in st["settings"] if st["settings"][k] != settings.resume_key().get(k))
            raise HDBError(f"The checkpoint in '{state}' was written with other settings ({', '.join(changed)}); "
                           f"use the same settings to resume, or delete that folder to start again.")
        net.load_state_dict(prefixed(tensors, "net"))
        load_optimizer_state(optimizer, tensors, st["optimizer"])
        start = st["step"]
        if accelerator.is_main_process:
            log.info("resuming stage 1 from step %d", start)
    net, optimizer = accelerator.prepare(net, optimizer)
    raw = accelerator.unwrap_model(net)

    loss_log = None
    if accelerator.is_main_process:
        loss_log = LossLog(os.path.join(state, "loss.csv"),
                           ["step", "loss", "diffusion", "weight", "lr", "weight_to_diffusion_grad"])
        loss_log.keep(lambda r: int(r["step"]) <= start)
    objective = Objective(pairs, base, image_encoder, settings, device, dtype)
    world, rank = accelerator.num_processes, accelerator.process_index
    bar = tqdm(total=settings.steps, initial=start, disable=not (progress and accelerator.is_main_process),
               desc="stage 1", unit="step", dynamic_ncols=True)
    net.train()
    with objective:
        for step in range(start, settings.steps):
            terms = objective.terms(net, step, rank, world)
            optimizer.zero_grad(set_to_none=True)
            lr = settings.learning_rate * lr_factor(step, settings)
            for group in optimizer.param_groups:
                group["lr"] = lr    # set from the step, so a resumed run needs no scheduler state
            norms = objective.backward(terms)
            if settings.grad_clip > 0:
                accelerator.clip_grad_norm_(net.parameters(), settings.grad_clip)
            optimizer.step()
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
            if done % settings.checkpoint_every == 0 and done < settings.steps:
                _checkpoint(accelerator, ckpt_path, raw, optimizer, done, settings)
            if on_step is not None:
                on_step({"step": done, "loss": logged[0], "diffusion": logged[1], "weight": logged[2], "net": raw,
                         "rank": rank})
    bar.close()
    accelerator.wait_for_everyone()
    summary = {"steps": settings.steps, "identities": len(pairs), "skipped": skips.summary(),
               "output": output, "state_dir": state}
    if accelerator.is_main_process:
        raw.info = {"trained_with": "hdb train-hypernet", "identities": str(len(pairs)), "steps": str(settings.steps),
                    "alpha": str(settings.alpha), "beta": str(settings.beta), "trigger": settings.trigger,
                    "prompt": settings.prompt.format(trigger=settings.trigger)}
        save_hypernet(raw, output)
    accelerator.wait_for_everyone()
    return summary


def _checkpoint(accelerator, path, raw, optimizer, step, settings) -> None:
    if accelerator.is_main_process:
        tensors, opt_meta = optimizer_state(optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer)
        tensors.update({f"net.{k}": v for k, v in raw.state_dict().items()})
        save_checkpoint(path, tensors, {"step": step, "optimizer": opt_meta, "settings": settings.resume_key()})
    accelerator.wait_for_everyone()
