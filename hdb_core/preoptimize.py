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

import csv
import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from . import data
from .base_model import BaseModel, encode_latents, load_base_model, tokenize, training_target
from .checkpoint import load_checkpoint, load_optimizer_state, optimizer_state, save_checkpoint
from .diffusers_lidb import LiDBInjector, check_layers_match, stack_train, unstack_train
from .errors import HDBError
from .file_format import load_lidb, save_lidb
from .lidb import LiDB, LiDBConfig
from .seeding import generator

log = logging.getLogger("hdb")
STATE_DIR = ".hdb"


@dataclass
class PreoptimizeSettings:
    trigger: str = "sks"
    prompt: str = "a {trigger} face"
    steps: int = 300
    learning_rate: float = 1e-3
    batch_size: int = 8
    resolution: int = 512
    seed: int = 0
    a: int = 100
    b: int = 50
    rank: int = 1
    lidb_seed: int = 0
    text_encoder: bool = True
    flip: bool = True
    face_check: str = "detect"
    min_size: int = 128
    checkpoint_every: int = 50
    dtype: str = "auto"

    def validate(self) -> None:
        if self.steps < 1:
            raise HDBError(f"steps is {self.steps}; use at least 1 (300 is a good value for stage 0).")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise HDBError(f"learning rate is {self.learning_rate}; use a positive value such as 1e-3.")
        if self.batch_size < 1:
            raise HDBError(f"batch size is {self.batch_size}; use 1 or more identities per batch.")
        if self.resolution < 64 or self.resolution % 64:
            raise HDBError(f"resolution {self.resolution} is not a multiple of 64 (at least 64); use 512 for SD1.5.")
        if self.checkpoint_every < 1:
            raise HDBError(f"checkpoint interval is {self.checkpoint_every}; use 1 or more steps.")
        if "{trigger}" not in self.prompt:
            raise HDBError(f"The prompt {self.prompt!r} has no {{trigger}} placeholder; use e.g. 'a {{trigger}} face'.")
        if self.face_check not in data.FACE_CHECKS:
            raise HDBError(f"face check must be one of {', '.join(data.FACE_CHECKS)}, not {self.face_check!r}.")
        if self.dtype not in DTYPES:
            raise HDBError(f"dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}.")

    def fingerprint(self) -> str:
        """Everything that changes the numbers (not batch size: it does not change them)."""
        d = asdict(self)
        for k in ("batch_size", "checkpoint_every", "min_size"):
            d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return DTYPES[name]


@dataclass
class ProcessInfo:
    """Which slice of the work this process owns (from accelerate, or 0 of 1)."""

    index: int = 0
    count: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.index == 0

    @classmethod
    def from_accelerate(cls, cpu: bool = False) -> "ProcessInfo":
        from accelerate import PartialState

        state = PartialState(cpu=bool(cpu))
        return cls(state.process_index, state.num_processes, state.device)


def shard(items: list, info: ProcessInfo) -> list:
    """Process k of n takes items k, k+n, ...: every item exactly once across processes."""
    return items[info.index::info.count]


def state_dir(output: str) -> str:
    return os.path.join(output, STATE_DIR)


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


class LossLog:
    """Append-only CSV of training losses, flushed every row (it survives a kill)."""

    def __init__(self, path: str, header: list[str]):
        self.path, self.header = path, header
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if not os.path.exists(path):
            with open(path, "w", newline="") as f:
                csv.writer(f).writerow(header)

    def rows(self) -> list[dict]:
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))

    def keep(self, predicate: Callable[[dict], bool]) -> None:
        """Drop rows a resumed run will redo (rows logged after the checkpoint it resumes from)."""
        from .atomic import write_atomic

        rows = [r for r in self.rows() if predicate(r)]

        def write(tmp):
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, self.header)
                w.writeheader()
                w.writerows(rows)
        write_atomic(self.path, write)

    def append(self, *values) -> None:
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow(values)
            f.flush()


def common_start(layers, config: LiDBConfig, seed: int) -> LiDB:
    """The trainable start (A random, B zero) shared by every identity.

    One start for all identities (not one per identity) keeps the stage-0 targets
    comparable: the hypernetwork then learns how identities move away from a
    common point instead of having to guess a random per-identity A.
    """
    return LiDB.trainable_start(layers, config, generator(seed, "stage0-init"))


def init_chunk(ids: list[str], layers, config: LiDBConfig, seed: int):
    """The common start repeated for every identity of the chunk, stacked [N, ...]."""
    start = common_start(layers, config, seed)
    return stack_train([start] * len(ids))


def draw_batch(ids, latents, num_timesteps: int, seed: int, step: int, flip: bool):
    """(latents, noise, timesteps) for one step; every identity draws from its own generator."""
    lat, noise, ts = [], [], []
    for ident, lat_i in zip(ids, latents):
        g = generator(seed, ident, "step", step)
        k = int(torch.randint(lat_i.shape[0], (1,), generator=g))
        f = int(torch.randint(2, (1,), generator=g)) if flip else 0
        t = int(torch.randint(num_timesteps, (1,), generator=g))
        x = lat_i[k, f]
        lat.append(x)
        noise.append(torch.randn(x.shape, generator=g))
        ts.append(t)
    return torch.stack(lat), torch.stack(noise), torch.tensor(ts, dtype=torch.long)


def diffusion_loss(base: BaseModel, injector: LiDBInjector, a, b, input_ids, latents, noise, timesteps,
                   dtype: torch.dtype, text_encoder: bool) -> torch.Tensor:
    """Per-sample MSE [N] of the UNet (with each sample's LiDB) on noised latents."""
    device = latents.device
    injector.set_train(a, b)
    if text_encoder:
        context = base.text_encoder(input_ids)[0]
    else:
        with torch.no_grad():
            context = base.text_encoder(input_ids)[0]
    noisy = base.noise_scheduler.add_noise(latents, noise, timesteps)
    pred = base.unet(noisy.to(dtype), timesteps.to(device), context.to(dtype)).sample
    target = training_target(base, latents, noise, timesteps)
    return (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3))


def _encode_identity(base: BaseModel, images: torch.Tensor, device, flip: bool) -> torch.Tensor:
    """[K, 2, 4, h, w] latents of the identity's images (index 1: mirrored, when flipping is on)."""
    pixels = data.to_model_range(images)
    lat = encode_latents(base, pixels, device)
    lat_flip = encode_latents(base, pixels.flip(-1), device) if flip else lat
    return torch.stack([lat, lat_flip], dim=1).cpu()


def preoptimize(data_dir: str, base_model: str | BaseModel, output: str, settings: PreoptimizeSettings,
                base_config: str | None = None, process: ProcessInfo | None = None, progress: bool = True,
                on_step: Callable[[dict], None] | None = None) -> dict:
    """Train the LiDBs of this process's share of `data_dir` into `output`; returns a summary dict."""
    from tqdm.auto import tqdm

    settings.validate()
    process = process or ProcessInfo()
    skips = data.Skips()
    identities = data.scan(data_dir, settings.min_size, skips)           # fails fast: empty / all tiny
    base = base_model if isinstance(base_model, BaseModel) else load_base_model(base_model, base_config)
    device = torch.device(process.device)
    dtype = resolve_dtype(settings.dtype, device)
    base.to(device, dtype)
    layers = base.layers(settings.text_encoder)
    config = LiDBConfig(settings.a, settings.b, settings.rank, settings.lidb_seed)
    os.makedirs(state_dir(output), exist_ok=True)
    check_existing_outputs(output, layers, config)

    mine = shard(identities, process)
    _write_json(os.path.join(state_dir(output), f"shard-{process.index}-of-{process.count}.json"),
                {"identities": [i.id for i in mine]})
    todo = [i for i in mine if not os.path.exists(lidb_path(output, i.id))]
    already = len(mine) - len(todo)
    by_id = {i.id: i for i in todo}

    ckpt_path = os.path.join(state_dir(output), f"stage0-rank{process.index}.safetensors")
    loss_log = LossLog(os.path.join(output, "logs", f"stage0_loss_rank{process.index}.csv"),
                       ["chunk", "step", "loss"])
    chunks = [[i.id for i in todo[k:k + settings.batch_size]] for k in range(0, len(todo), settings.batch_size)]
    resume = _resumable(ckpt_path, settings, by_id)
    if resume is not None:
        ids = resume[1]["ids"]
        chunks = [ids] + [[x for x in c if x not in ids] for c in chunks]
        chunks = [c for c in chunks if c]
        start_step = resume[1]["step"]
        loss_log.keep(lambda r: r["chunk"] != resume[1]["chunk"] or int(r["step"]) <= start_step)
        log.info("resuming chunk %s from step %d", resume[1]["chunk"], start_step)

    prompt = settings.prompt.format(trigger=settings.trigger)
    injector = LiDBInjector(base.modules(settings.text_encoder), layers, config, device)
    num_timesteps = base.noise_scheduler.config.num_train_timesteps
    trained = 0
    bar = tqdm(total=len(chunks) * settings.steps, disable=not progress, position=process.index,
               desc=f"stage 0 [{process.index + 1}/{process.count}]", unit="step", dynamic_ncols=True)
    with injector:
        for chunk in chunks:
            chunk_name = hashlib.sha256("|".join(chunk).encode()).hexdigest()[:12]
            ids, latents = [], []
            for ident in chunk:
                images = data.load_identity(by_id[ident], settings.resolution, settings.face_check, skips)
                if images is not None:
                    ids.append(ident)
                    latents.append(_encode_identity(base, images, device, settings.flip))
            if not ids:
                bar.update(settings.steps)
                continue
            a, b = init_chunk(ids, layers, config, settings.seed)
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
            input_ids = tokenize(base, [prompt] * len(ids), device)
            for step in range(step0, settings.steps):
                lat, noise, ts = draw_batch(ids, latents, num_timesteps, settings.seed, step, settings.flip)
                per_sample = diffusion_loss(base, injector, a, b, input_ids, lat.to(device), noise.to(device),
                                            ts.to(device), dtype, settings.text_encoder)
                optimizer.zero_grad(set_to_none=True)
                per_sample.sum().backward()
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
            for ident, lidb in zip(ids, unstack_train(a, b, layers, config, **info)):
                save_lidb(lidb, lidb_path(output, ident))
            trained += len(ids)
            if os.path.exists(ckpt_path):
                os.unlink(ckpt_path)
    bar.close()
    summary = {"rank": process.index, "identities": len(mine), "trained": trained, "already_done": already,
               "skipped": skips.summary(), "skip_counts": skips.counts(),
               "skipped_files": [[p, r] for p, r in skips.items]}
    _write_json(os.path.join(state_dir(output), f"summary-rank{process.index}.json"), summary)
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


def _write_json(path: str, obj) -> None:
    from .atomic import write_atomic

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
    write_atomic(path, write)


def loss_curve(output: str, rank: int = 0) -> list[float]:
    """Mean stage-0 loss per step index over the chunks this rank trained (for the PNG)."""
    path = os.path.join(output, "logs", f"stage0_loss_rank{rank}.csv")
    if not os.path.exists(path):
        return []
    sums: dict[int, list[float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            sums.setdefault(int(row["step"]), []).append(float(row["loss"]))
    return [sum(v) / len(v) for _, v in sorted(sums.items())]
