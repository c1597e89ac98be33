"""Stage 0: pre-optimise one LiDB per identity of a face dataset (the hypernetwork's targets).

Identities are trained in chunks of `batch_size`: every sample of a step is a
different identity with its own LiDB, applied by `LiDBInjector` with batched
per-sample residuals, so one UNet forward/backward serves the whole chunk.
Each identity's loss is its own mean squared error and the chunk's loss is
their sum, so an identity's gradient, its Adam moments and (with per-identity
seeding, see `seeding`) its random draws are exactly what they would be alone:
batch size changes throughput, not results.

Scale-out: under `accelerate launch`, process k of n trains identities
k, k+n, k+2n, ... of the sorted list (each exactly once); finished identities
(their LiDB file exists) are skipped, so a re-run continues where it stopped.
Within a chunk a checkpoint is written every `checkpoint_every` steps.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from hdb_core.training import data
from hdb_core import defaults
from hdb_core.errors import HDBError
from hdb_core.lidb.file import load_lidb, save_lidb
from hdb_core.lidb.targets import check_layers_match
from hdb_core.lidb.batch import LayerFactors, stack_train, unstack_train
from hdb_core.lidb.weights import LiDB, LiDBConfig
from hdb_core.training.base_model import BaseModel, load_base_model, photo_latents, tokenize
from hdb_core.training.checkpoint import load_checkpoint, load_optimizer_state, optimizer_state, save_checkpoint
from hdb_core.training.injector import LowRankInjector
from hdb_core.training.objective import PriorTerm, check_prior, draw, pick_latents
from hdb_core.training.prepared import PreparedData, is_prepared
from hdb_core.training.runtime import (LossLog, ProcessInfo, autocast, check_shared_options, resolve_dtype, shard,
                                       state_dir, write_json)
from hdb_core.training.seeding import generator

log = logging.getLogger("hdb")


@dataclass
class PreoptimizeSettings:
    trigger: str = defaults.TRIGGER
    prompt: str = "{trigger}"
    steps: int = defaults.STAGE0_STEPS
    learning_rate: float = defaults.STAGE0_LR
    lr_schedule: str = defaults.STAGE0_LR_SCHEDULE
    decay_to_start: float = defaults.STAGE0_DECAY_TO_START
    prior_weight: float = defaults.STAGE_PRIOR_WEIGHT   # the prior term for `class_prompt` (objective.PriorTerm)
    class_prompt: str = defaults.CLASS_PROMPT
    repeats: int = defaults.STAGE0_REPEATS    # independent runs per identity, combined by `combine_repeats`
    batch_size: int = 8                       # LiDBs trained together: identities x repeats
    resolution: int = defaults.RESOLUTION
    seed: int = 0
    a: int = 100
    b: int = 50
    rank: int = 1
    lidb_seed: int = 0
    text_encoder: bool = True
    flip: bool = defaults.MIRROR
    face_check: str = "detect"
    min_size: int = 128
    checkpoint_every: int = 50
    dtype: str = "auto"
    autocast: str = "auto"          # bf16 autocast of the forward: auto = on CUDA cards with bf16, off on CPU
    gradient_checkpointing: bool = False

    def validate(self) -> None:
        check_shared_options(self)
        if self.steps < 1:
            raise HDBError(f"steps is {self.steps}; use at least 1 (300 is a good value for stage 0).")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise HDBError(f"learning rate is {self.learning_rate}; use a positive value such as 1e-3.")
        if self.batch_size < 1:
            raise HDBError(f"batch size is {self.batch_size}; use 1 or more LiDBs (identities x repeats) per batch.")
        if self.repeats < 1:
            raise HDBError(f"repeats is {self.repeats}; use 1 (one run per identity) or more (runs averaged).")
        if not (self.decay_to_start >= 0 and math.isfinite(self.decay_to_start)):
            raise HDBError(f"decay to start is {self.decay_to_start}; use 0 (off) or a small positive value "
                           f"such as 3e-4.")
        check_prior(self.prior_weight, self.class_prompt)
        if self.lr_schedule not in defaults.STAGE0_LR_SCHEDULES:
            raise HDBError(f"Unknown stage-0 learning-rate schedule {self.lr_schedule!r}; use one of "
                           f"{', '.join(defaults.STAGE0_LR_SCHEDULES)}.")
        if "{trigger}" not in self.prompt:
            raise HDBError(f"The prompt {self.prompt!r} has no {{trigger}} placeholder; "
                           f"use e.g. 'a photo of {{trigger}}'.")

    def fingerprint(self) -> str:
        """Everything that changes the numbers (not batch size: it does not change them). Options added
        later count only when set, so a chunk checkpoint written before they existed still resumes."""
        d = asdict(self)
        for k in ("batch_size", "checkpoint_every", "min_size", "gradient_checkpointing"):
            d.pop(k)
        if not d["prior_weight"]:
            d.pop("class_prompt")
        for k, off in (("lr_schedule", "constant"), ("decay_to_start", 0.0), ("repeats", 1), ("prior_weight", 0.0)):
            if d[k] == off:
                d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def stage0_lr(step: int, settings: PreoptimizeSettings) -> float:
    """The learning rate of `step`: constant, or cosine-decayed to zero so the LiDB each identity ends with is
    where the optimisation settled rather than wherever Adam's last constant-size steps left it."""
    if settings.lr_schedule == "constant":
        return settings.learning_rate
    return settings.learning_rate * 0.5 * (1 + math.cos(math.pi * step / settings.steps))


def lidb_path(output: str, ident: str) -> str:
    return os.path.join(output, f"{ident}.safetensors")


def check_existing_outputs(output: str, layers, config: LiDBConfig) -> None:
    """Refuse an output folder whose finished LiDBs were made for another model or a/b/rank/seed."""
    for name in sorted(os.listdir(output)):
        if name.endswith(".safetensors"):
            existing = load_lidb(os.path.join(output, name))
            check_layers_match(existing.layers, layers, f"The existing LiDB '{name}' in the output folder")
            if tuple(existing.layers) != tuple(layers) or existing.config != config:
                raise HDBError(f"The output folder '{output}' already holds LiDBs made with other settings "
                               f"('{name}': a={existing.config.a}, b={existing.config.b}, rank={existing.config.rank}, "
                               f"seed={existing.config.seed}, {len(existing.layers)} layers); use a new output folder.")
            return


def common_start(layers, config: LiDBConfig, seed: int) -> LiDB:
    """The trainable start (A random, B zero) shared by every identity.

    One start for all identities (not one per identity) keeps the stage-0 targets
    comparable: the hypernetwork then learns how identities move away from a
    common point instead of having to guess a random per-identity A.
    """
    return LiDB.trainable_start(layers, config, generator(seed, "stage0-init"))


def distance_to_start(a, b, start_a, start_b) -> torch.Tensor:
    """Per identity [N]: squared distance of the train matrices from the common start.

    Added to the loss (`decay_to_start`), it settles the directions the photos leave free at the start
    instead of wherever the noise draws pushed them, so two runs on one identity end alike.
    """
    return sum((a[n] - start_a[n]).pow(2).flatten(1).sum(1) + (b[n] - start_b[n]).pow(2).flatten(1).sum(1)
               for n in a)


def init_chunk(ids: list[str], layers, config: LiDBConfig, seed: int):
    """The common start repeated for every identity of the chunk, stacked [N, ...]."""
    start = common_start(layers, config, seed)
    return stack_train([start] * len(ids))


def run_names(ids: list[str], repeats: int) -> list[str]:
    """One name per trained LiDB of a chunk, identity-major; the first run of an identity is named as the
    identity itself, so one repeat draws exactly what stage 0 drew before repeats existed."""
    return [i if r == 0 else f"{i}#repeat{r}" for i in ids for r in range(repeats)]


def combine_repeats(a: dict, b: dict, start_a: dict, start_b: dict, repeats: int) -> tuple[dict, dict]:
    """Per identity, the start plus the mean of its runs' offsets from it, scaled to the runs' mean offset length.

    Independent runs of one identity agree only in part (docs/evidence.md: dW-offset cosine 0.36), so the
    mean keeps what they share and cancels each run's own draws; but cancelling also shortens it, and a
    shorter LiDB identifies the person less, so it is scaled back to the length a single run reaches.
    Tensors are stacked identity-major [N * repeats, ...]; the offset spans every layer's A and B.
    """
    if repeats == 1:
        return a, b
    names = list(a)

    def per_identity(t: dict, start: dict) -> list[torch.Tensor]:
        return [(t[n] - start[n]).reshape(-1, repeats, *t[n].shape[1:]) for n in names]

    offsets = per_identity(a, start_a) + per_identity(b, start_b)           # each [N, repeats, ...]
    run_length = torch.sqrt(sum(o.flatten(2).pow(2).sum(2) for o in offsets)).mean(1)          # [N]
    mean_length = torch.sqrt(sum(o.mean(1).flatten(1).pow(2).sum(1) for o in offsets))         # [N]
    scale = run_length / mean_length.clamp_min(1e-30)      # a zero mean offset stays zero

    def combined(t: dict, start: dict, k: int) -> dict:
        out = {}
        for i, n in enumerate(names):
            mean = offsets[k + i].mean(1)
            out[n] = start[n][::repeats] + mean * scale.view(-1, *([1] * (mean.dim() - 1)))
        return out

    return combined(a, start_a, 0), combined(b, start_b, len(names))


def draw_batch(ids, latents, num_timesteps: int, seed: int, step: int, flip: bool):
    """(latents, noise, timesteps) for one step; every run (`run_names`) draws from its own generator."""
    lat, noise, ts = [], [], []
    for ident, lat_i in zip(ids, latents):
        d = draw(generator(seed, ident, "step", step), lat_i.shape[0], flip, num_timesteps, lat_i.shape[2:])
        lat.append(pick_latents(lat_i, d))
        noise.append(d.noise)
        ts.append(d.timestep)
    return torch.stack(lat), torch.stack(noise), torch.tensor(ts, dtype=torch.long)


def diffusion_loss(base: BaseModel, injector: LowRankInjector, factors, input_ids, latents, noise, timesteps,
                   dtype: torch.dtype, text_encoder: bool, prior: PriorTerm | None = None,
                   prior_weight: float = 0.0) -> torch.Tensor:
    """Per-sample loss [N] of the UNet with each sample's LiDB factors, on noised latents (plus
    `prior_weight` times each sample's prior term with `prior`)."""
    prior_loss = prior(factors, latents, noise, timesteps, dtype) if prior is not None else 0.0
    injector.set_factors(factors)
    with torch.enable_grad() if text_encoder else torch.no_grad():
        context = base.text_encoder(input_ids)[0]
    return base.loss(latents, noise, timesteps, context, dtype) + prior_weight * prior_loss


def preoptimize(data_dir: str, base_model: str | BaseModel, output: str, settings: PreoptimizeSettings,
                base_config: str | None = None, process: ProcessInfo | None = None, progress: bool = True,
                on_step: Callable[[dict], None] | None = None) -> dict:
    """Train the LiDBs of this process's share of `data_dir` into `output`; returns a summary dict.

    `data_dir` is a folder made by `hdb prepare` (latents are read from it) or a face folder
    (each chunk's photos are decoded, checked and VAE-encoded when the chunk starts).
    """
    from tqdm.auto import tqdm

    settings.validate()
    process = process or ProcessInfo()
    skips = data.Skips()
    prepared = PreparedData(data_dir) if is_prepared(data_dir) else None
    if prepared is not None:
        settings = prepared.applied_to(settings)
        identities = [data.Identity(i, ()) for i in prepared.ids]
    else:
        identities = data.scan(data_dir, settings.min_size, skips)       # fails fast: empty / all tiny
    base = base_model if isinstance(base_model, BaseModel) else load_base_model(base_model, base_config)
    device = torch.device(process.device)
    dtype = resolve_dtype(settings.dtype, device)
    base.to(device, dtype)
    layers = base.layers(settings.text_encoder)
    config = LiDBConfig(settings.a, settings.b, settings.rank, settings.lidb_seed)
    state = state_dir(output)
    os.makedirs(output, exist_ok=True)
    os.makedirs(state, exist_ok=True)
    check_existing_outputs(output, layers, config)

    mine = shard(identities, process)
    write_json(os.path.join(state, f"shard-{process.index}-of-{process.count}.json"),
                {"identities": [i.id for i in mine]})
    todo = [i for i in mine if not os.path.exists(lidb_path(output, i.id))]
    already = len(mine) - len(todo)
    by_id = {i.id: i for i in todo}

    ckpt_path = os.path.join(state, f"stage0-rank{process.index}.safetensors")
    loss_log = LossLog(loss_log_path(output, process.index), ["chunk", "step", "loss"])
    per_chunk = max(1, settings.batch_size // settings.repeats)
    chunks = [[i.id for i in todo[k:k + per_chunk]] for k in range(0, len(todo), per_chunk)]
    resume = _resumable(ckpt_path, settings, by_id)
    if resume is not None:
        ids = resume[1]["ids"]
        chunks = [ids] + [[x for x in c if x not in ids] for c in chunks]
        chunks = [c for c in chunks if c]
        start_step = resume[1]["step"]
        loss_log.keep(lambda r: r["chunk"] != resume[1]["chunk"] or int(r["step"]) <= start_step)
        log.info("resuming chunk %s from step %d", resume[1]["chunk"], start_step)

    prompt = settings.prompt.format(trigger=settings.trigger)
    injector = base.injector(layers)
    factors = LayerFactors(config, layers, device)
    prior = (PriorTerm(base, injector, tokenize(base, [settings.class_prompt], device), per_sample=True)
             if settings.prior_weight else None)
    trained = 0
    bar = tqdm(total=len(chunks) * settings.steps, disable=not progress, position=process.index,
               desc=f"stage 0 [{process.index + 1}/{process.count}]", unit="step", dynamic_ncols=True)
    with injector, base.checkpointing(settings.gradient_checkpointing):
        for chunk in chunks:
            chunk_name = hashlib.sha256("|".join(chunk).encode()).hexdigest()[:12]
            ids, latents = [], []
            for ident in chunk:
                if prepared is not None:
                    ids.append(ident)
                    latents.append(prepared.identity_latents(ident))
                    continue
                images = data.load_identity(by_id[ident], settings.resolution, settings.face_check, skips)
                if images is not None:
                    ids.append(ident)
                    latents.append(photo_latents(base, images, device, settings.flip).cpu())
            if not ids:
                bar.update(settings.steps)
                continue
            runs = run_names(ids, settings.repeats)
            latents = [lat for lat in latents for _ in range(settings.repeats)]
            a, b = init_chunk(runs, layers, config, settings.seed)
            start_a, start_b = ({n: v.to(device, copy=True) for n, v in t.items()} for t in (a, b))
            params = [t.to(device).requires_grad_(True) for t in (*a.values(), *b.values())]
            a = dict(zip(a, params[:len(a)]))
            b = dict(zip(b, params[len(a):]))
            optimizer = torch.optim.Adam(params, lr=settings.learning_rate)
            step0 = 0
            if resume is not None and resume[1]["ids"] == chunk:
                tensors, st = resume
                with torch.no_grad():
                    for name in a:
                        a[name].copy_(tensors[f"a.{name}"])
                        b[name].copy_(tensors[f"b.{name}"])
                load_optimizer_state(optimizer, tensors, st["optimizer"])
                step0 = st["step"]
                bar.update(step0)
                resume = None
            input_ids = tokenize(base, [prompt] * len(runs), device)
            for step in range(step0, settings.steps):
                lat, noise, ts = draw_batch(runs, latents, base.num_timesteps, settings.seed, step, settings.flip)
                with autocast(settings.autocast, device):
                    per_sample = diffusion_loss(base, injector, factors.named(a, b), input_ids, lat.to(device),
                                                noise.to(device), ts.to(device), dtype, settings.text_encoder,
                                                prior, settings.prior_weight)
                objective = per_sample.sum()
                if settings.decay_to_start:
                    objective = objective + settings.decay_to_start * distance_to_start(a, b, start_a, start_b).sum()
                optimizer.zero_grad(set_to_none=True)
                objective.backward()
                for group in optimizer.param_groups:
                    group["lr"] = stage0_lr(step, settings)
                optimizer.step()
                loss = float(per_sample.detach().mean())
                if not math.isfinite(loss):
                    raise HDBError(f"The stage-0 loss became {loss} at step {step + 1}; lower the learning rate "
                                   f"(now {settings.learning_rate:g}) or use --dtype fp32.")
                loss_log.append(chunk_name, step + 1, f"{loss:.6g}")
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if (step + 1) % settings.checkpoint_every == 0 and step + 1 < settings.steps:
                    _save_chunk_checkpoint(ckpt_path, chunk, chunk_name, step + 1, a, b, optimizer, settings)
                if on_step is not None:
                    on_step({"chunk": chunk, "step": step + 1, "loss": loss})
            injector.clear()
            info = dict(trigger=settings.trigger, source="trained", base_model=base.name)
            with torch.no_grad():
                a, b = combine_repeats(a, b, start_a, start_b, settings.repeats)
            for ident, lidb in zip(ids, unstack_train(a, b, layers, config, **info)):
                save_lidb(lidb, lidb_path(output, ident))
            trained += len(ids)
            if os.path.exists(ckpt_path):
                os.unlink(ckpt_path)
    bar.close()
    summary = {"rank": process.index, "identities": len(mine), "trained": trained, "already_done": already,
               "skipped": skips.summary(), "skip_counts": skips.counts(),
               "skipped_files": [[p, r] for p, r in skips.items]}
    write_json(os.path.join(state, f"summary-rank{process.index}.json"), summary)
    log.info("stage 0 rank %d: %d trained, %d already done, %s", process.index, trained, already, skips.summary())
    return summary


def _save_chunk_checkpoint(path, chunk, chunk_name, step, a, b, optimizer, settings) -> None:
    tensors, opt_meta = optimizer_state(optimizer)
    tensors.update({f"a.{k}": v for k, v in a.items()})
    tensors.update({f"b.{k}": v for k, v in b.items()})
    save_checkpoint(path, tensors, {"ids": chunk, "chunk": chunk_name, "step": step, "optimizer": opt_meta,
                                    "fingerprint": settings.fingerprint()})


def _resumable(path: str, settings: PreoptimizeSettings, todo: dict):
    """The chunk checkpoint, if it belongs to this run and its identities are still to do."""
    found = load_checkpoint(path)
    if found is None:
        return None
    tensors, st = found
    if st.get("fingerprint") != settings.fingerprint():
        log.warning("ignoring %s: it was written with other settings", path)
        return None
    if not st["ids"] or not all(i in todo for i in st["ids"]):
        log.warning("ignoring %s: its identities are finished or belong to another process now", path)
        return None
    return tensors, st


def loss_log_path(output: str, rank: int = 0) -> str:
    return os.path.join(state_dir(output), f"stage0_loss_rank{rank}.csv")
