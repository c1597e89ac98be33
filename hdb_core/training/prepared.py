"""`hdb prepare`: a face dataset decoded, checked, VAE-encoded and CLIP-encoded once, for both stages.

Stage 0 and stage 1 only ever need each photo's latents (and its mirror's) and the frozen
image encoder's features of the photo (and its mirror). Computing them once, before training,
takes the VAE and the image encoder out of every training step and every rank, and lets
training read one photo at a time instead of holding the dataset in memory.

    prepared/
      prepared.json               settings, base model, encoder spec, dataset fingerprint
      shards/shard-00000.safetensors
                                  latents  [N, 2, C, h, w] float32 (index 1: the mirrored photo)
                                  features [N, 2, T, hidden] float16 (same order)
                                  metadata: rows (identity, photo) and the photos skipped, with why
      index.json                  identity -> [[shard, row], ...], written once every shard exists

Shard k holds identities k*S .. (k+1)*S-1 of the sorted dataset; under `accelerate launch`
process r writes the shards k with k % n == r. A shard is written to a temporary name and
renamed, so an existing shard is complete and a re-run continues with the missing ones.
Features are stored in float16 (half the disk: ~1.3 MB per photo and mirror at ViT-H size);
latents stay float32.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hdb_core import defaults
from hdb_core.atomic import write_atomic
from hdb_core.errors import HDBError
from hdb_core.hypernet.image_encoder import EncoderSpec
from hdb_core.training import data
from hdb_core.training.runtime import ProcessInfo, check_shared_options, resolve_dtype, write_json

log = logging.getLogger("hdb")

FORMAT = "hyperdreambooth.prepared"
VERSION = 1
SETTINGS_FILE = "prepared.json"
INDEX_FILE = "index.json"


@dataclass
class PrepareSettings:
    resolution: int = defaults.RESOLUTION
    face_check: str = "detect"
    min_size: int = 128
    shard_size: int = 64            # identities per shard file
    batch_size: int = 16            # photos encoded together
    dtype: str = "auto"             # the image encoder's dtype (the VAE stays float32)

    def validate(self) -> None:
        check_shared_options(self)
        if self.shard_size < 1 or self.batch_size < 1:
            raise HDBError(f"shard size ({self.shard_size}) and batch size ({self.batch_size}) must be at least 1.")

    def key(self) -> dict:
        """What a resumed run must share with the shards already written (batch size and dtype may change)."""
        return {k: v for k, v in asdict(self).items() if k not in ("batch_size", "dtype")}


def is_prepared(path: str) -> bool:
    return os.path.isfile(os.path.join(path, SETTINGS_FILE))


def shard_name(k: int) -> str:
    return f"shards/shard-{k:05d}.safetensors"


def _fingerprint(identities: list[data.Identity]) -> str:
    h = hashlib.sha256()
    for ident in identities:
        h.update(json.dumps([ident.id, [os.path.basename(p) for p in ident.paths]]).encode())
    return h.hexdigest()[:16]


@torch.no_grad()
def encode_photos(base, encoder, images: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents [N, 2, C, h, w] float32, features [N, 2, T, hidden] float16) of photos [N, H, W, 3] and mirrors."""
    from hdb_core.training.base_model import photo_latents

    latents = photo_latents(base, images, device, mirror=True).cpu()
    features = torch.stack([encoder.encode(images), encoder.encode(images.flip(2))], dim=1)
    return latents, features.to(torch.float16).cpu()


def prepare(data_dir: str, base_model, image_encoder, output: str, settings: PrepareSettings,
            base_config: str | None = None, process: ProcessInfo | None = None, progress: bool = True,
            on_shard: Callable[[int], None] | None = None) -> dict:
    """Write this process's shards of `data_dir` to `output` (and, on the main process, the index)."""
    from tqdm.auto import tqdm

    from hdb_core.hypernet.image_encoder import ClipImageEncoder
    from hdb_core.training.base_model import BaseModel, load_base_model

    settings.validate()
    process = process or ProcessInfo()
    skips = data.Skips()
    identities = data.scan(data_dir, settings.min_size, skips)
    device = torch.device(process.device)
    base = base_model if isinstance(base_model, BaseModel) else load_base_model(base_model, base_config)
    base.vae.to(device).eval().requires_grad_(False)      # float32 as loaded (SD VAEs overflow in fp16)
    if isinstance(image_encoder, str):
        if not os.path.exists(image_encoder):
            raise HDBError(f"Image encoder '{image_encoder}' does not exist; pass --image-encoder with a local CLIP "
                           f"vision folder (config.json + model.safetensors) - nothing is downloaded.")
        image_encoder = ClipImageEncoder.from_pretrained(image_encoder, device=device,
                                                         dtype=resolve_dtype(settings.dtype, device))
    else:
        image_encoder.model.to(device)

    header = {"format": FORMAT, "format_version": VERSION, "settings": settings.key(), "base_model": base.name,
              "encoder": image_encoder.spec.to_dict(), "identities": len(identities),
              "dataset": _fingerprint(identities), "header_skips": [[p, r] for p, r in skips.items]}
    _check_or_write_header(output, header, process)

    shards = [identities[k:k + settings.shard_size] for k in range(0, len(identities), settings.shard_size)]
    mine = [k for k in range(len(shards)) if k % process.count == process.index]
    todo = [k for k in mine if not os.path.exists(os.path.join(output, shard_name(k)))]
    photos = sum(len(i.paths) for k in todo for i in shards[k])
    bar = tqdm(total=photos, disable=not progress, position=process.index, unit="photo", dynamic_ncols=True,
               desc=f"prepare [{process.index + 1}/{process.count}]")
    started, written = time.time(), 0
    for k in todo:
        written += _write_shard(os.path.join(output, shard_name(k)), shards[k], base, image_encoder, settings,
                                device, bar)
        if on_shard is not None:
            on_shard(k)
    bar.close()
    seconds = time.time() - started
    process.wait()
    summary = {"rank": process.index, "shards": len(mine), "already_done": len(mine) - len(todo),
               "photos": written, "seconds": round(seconds, 2),
               "photos_per_second": round(written / seconds, 2) if written and seconds > 0 else None}
    if process.index == 0:
        summary.update(write_index(output, len(shards)))
    process.wait()
    return summary


def _check_or_write_header(output: str, header: dict, process: ProcessInfo) -> None:
    path = os.path.join(output, SETTINGS_FILE)
    if os.path.exists(path):
        with open(path) as f:
            found = json.load(f)
        changed = sorted(k for k in ("settings", "base_model", "encoder", "dataset") if found.get(k) != header[k])
        if changed:
            raise HDBError(f"'{output}' was prepared differently ({' and '.join(changed)} changed, see {path}); "
                           f"use a new output folder, or delete that one to prepare again.")
        return
    process.wait()                  # every process has checked before the main one writes
    if process.index == 0:
        os.makedirs(os.path.join(output, "shards"), exist_ok=True)
        write_json(path, header)
    process.wait()


def _write_shard(path: str, identities: list[data.Identity], base, encoder, settings: PrepareSettings, device,
                 bar) -> int:
    """Decode, check, encode and write one shard; returns how many photos it holds."""
    skips = data.Skips()
    rows, images = [], []
    for ident in identities:
        usable = 0
        for p in ident.paths:
            try:
                images.append(data.prepare_image(p, settings.resolution, settings.face_check))
                rows.append([ident.id, p])
                usable += 1
            except ValueError as e:
                skips.add(p, str(e))
            bar.update(1)
        if not usable:
            skips.add(ident.id, "identity without usable photos")
    latents, features = [], []
    for i in range(0, len(images), settings.batch_size):
        lat, feat = encode_photos(base, encoder, torch.stack(images[i:i + settings.batch_size]), device)
        latents.append(lat)
        features.append(feat)
    side = settings.resolution // 8
    channels = int(base.vae.config.latent_channels)
    spec = encoder.spec
    tensors = {
        "latents": torch.cat(latents) if latents else torch.zeros(0, 2, channels, side, side),
        "features": torch.cat(features) if features else torch.zeros(0, 2, spec.num_tokens, spec.hidden_size,
                                                                      dtype=torch.float16),
    }
    meta = {"format": FORMAT, "rows": json.dumps(rows), "skipped": json.dumps(skips.items)}
    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return len(rows)


def write_index(output: str, num_shards: int) -> dict:
    """index.json from every shard's metadata (headers only); returns the counts of used and skipped."""
    with open(os.path.join(output, SETTINGS_FILE)) as f:
        header = json.load(f)
    identities: dict[str, list] = {}
    skips = data.Skips()
    skips.items.extend(tuple(x) for x in header.get("header_skips", []))
    for k in range(num_shards):
        name = shard_name(k)
        with safe_open(os.path.join(output, name), framework="pt") as f:
            meta = f.metadata()
        for row, (ident, _) in enumerate(json.loads(meta["rows"])):
            identities.setdefault(ident, []).append([name, row])
        skips.items.extend(tuple(x) for x in json.loads(meta["skipped"]))
    if not identities:
        raise HDBError(f"No photo of the dataset passed the checks ({skips.summary()}); use face photos of at least "
                       f"{header['settings']['min_size']} px, or --face-check none for pre-aligned data.")
    index = {"identities": dict(sorted(identities.items())), "skipped": [list(x) for x in skips.items],
             "skip_counts": skips.counts()}
    write_json(os.path.join(output, INDEX_FILE), index)
    return {"identities": len(identities), "photos_total": sum(len(v) for v in identities.values()),
            "skipped": skips.summary(), "skip_counts": skips.counts()}


class PreparedData:
    """Read access to a prepared folder: one photo's latents or features at a time (memory-mapped)."""

    def __init__(self, path: str):
        if not is_prepared(path) or not os.path.isfile(os.path.join(path, INDEX_FILE)):
            raise HDBError(f"'{path}' is not a finished prepared dataset (no {SETTINGS_FILE} and {INDEX_FILE}); "
                           f"run `hdb prepare` on it to the end.")
        self.path = path
        with open(os.path.join(path, SETTINGS_FILE)) as f:
            self.header = json.load(f)
        if int(self.header.get("format_version", 0)) > VERSION:
            raise HDBError(f"'{path}' was prepared by a newer version of this pack; update ComfyUI-HyperDreamBooth.")
        with open(os.path.join(path, INDEX_FILE)) as f:
            index = json.load(f)
        self.rows: dict[str, list[tuple[str, int]]] = {k: [(s, int(r)) for s, r in v]
                                                       for k, v in index["identities"].items()}
        self.ids = sorted(self.rows)
        self.skip_counts = index.get("skip_counts", {})
        self._files: dict[str, object] = {}

    @property
    def settings(self) -> dict:
        return self.header["settings"]

    @property
    def resolution(self) -> int:
        return int(self.settings["resolution"])

    def applied_to(self, settings):
        """`settings` with the resolution, face check and minimum size this data was prepared with (they win)."""
        return replace(settings, resolution=self.resolution, face_check=self.settings["face_check"],
                       min_size=int(self.settings["min_size"]))

    @property
    def encoder(self) -> EncoderSpec:
        return EncoderSpec.from_dict(self.header["encoder"])

    def num_photos(self, ident: str) -> int:
        return len(self.rows[ident])

    def _slice(self, ident: str, photo: int, tensor: str):
        shard, row = self.rows[ident][photo]
        if shard not in self._files:       # opened lazily, so data-loader workers open their own
            self._files[shard] = safe_open(os.path.join(self.path, shard), framework="pt")
        return self._files[shard].get_slice(tensor)[row:row + 1][0]

    def latents(self, ident: str, photo: int) -> torch.Tensor:
        """[2, C, h, w] float32: the photo's latents and its mirror's."""
        return self._slice(ident, photo, "latents")

    def identity_latents(self, ident: str) -> torch.Tensor:
        """[K, 2, C, h, w]: every usable photo of the identity (what stage 0 trains on)."""
        return torch.stack([self.latents(ident, k) for k in range(self.num_photos(ident))])

    def features(self, ident: str, photo: int, mirrored: bool) -> torch.Tensor:
        """[T, hidden] float32 image-encoder features of the photo (or its mirror)."""
        return self._slice(ident, photo, "features")[int(mirrored)].float()

    def __getstate__(self):         # data-loader workers reopen the shards
        state = dict(self.__dict__)
        state["_files"] = {}
        return state
