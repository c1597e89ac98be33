"""The .safetensors layout of a LiDB file.

Compact by design (the paper's "about 120 KB"): layers whose train matrices have
the same shape are stacked into one tensor per group, so the safetensors header
holds a handful of entries instead of two per layer. The layer order, the
architecture signature and how the LiDB was made travel in string metadata:

  tensors   a_train.<a>x<b> [L, a, r], b_train.<a>x<b> [L, r, b]   (float32)
            with the paper's relaxation (format version 2) also
            free_down.<in>x<out> [L, rf, in], free_up.<in>x<out> [L, out, rf]
  metadata  format, format_version, layers (JSON [[name, in, out], ...]),
            a, b, rank, seed, aux_generator, aux_checksum, arch, trigger,
            source, base_model, created_by, relaxation, free_rank, family (DiT
            LiDBs: "Flux.1", "SD3.5", ...; older files and UNet LiDBs have none)

A LiDB without a free part is written as version 1, byte-compatible with every
earlier reader; version 2 files are read by this version and refused, in one
sentence, by older ones.
"""
from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from hdb_core.lidb import aux_bases
from hdb_core.atomic import write_atomic
from hdb_core.errors import HDBError
from hdb_core.lidb.weights import FREE, LiDB, LiDBConfig
from hdb_core.storage import check_version, file_error, read
from hdb_core.lidb.targets import LayerSpec, describe

FORMAT_NAME = "hyperdreambooth.lidb"
FORMAT_VERSION = 2          # the newest this pack writes and reads
AUX_ONLY_VERSION = 1        # what a LiDB without a free LoRA part is written as
PACK_NAME = "ComfyUI-HyperDreamBooth"
INFO_KEYS = ("trigger", "source", "base_model", "family")   # family: older files have none


def _group_key(a_l: int, b_l: int) -> str:
    return f"{a_l}x{b_l}"


def lidb_to_safetensors(lidb: LiDB) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of the file, without writing it."""
    groups: dict[str, tuple[list, list]] = {}
    for spec in lidb.layers:
        a_l, b_l = lidb.config.layer_dims(spec)
        at, bt = groups.setdefault(_group_key(a_l, b_l), ([], []))
        at.append(lidb.a_train[spec.name].detach().float().cpu())
        bt.append(lidb.b_train[spec.name].detach().float().cpu())
    tensors = {}
    for key, (at, bt) in groups.items():
        tensors[f"a_train.{key}"] = torch.stack(at).contiguous()
        tensors[f"b_train.{key}"] = torch.stack(bt).contiguous()
    free: dict[str, tuple[list, list]] = {}
    for spec in lidb.layers if lidb.free_down else ():
        down, up = free.setdefault(_group_key(spec.in_features, spec.out_features), ([], []))
        down.append(lidb.free_down[spec.name].detach().float().cpu())
        up.append(lidb.free_up[spec.name].detach().float().cpu())
    for key, (down, up) in free.items():
        tensors[f"free_down.{key}"] = torch.stack(down).contiguous()
        tensors[f"free_up.{key}"] = torch.stack(up).contiguous()
    c = lidb.config
    meta = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION if free else AUX_ONLY_VERSION),
        "layers": json.dumps([[s.name, s.in_features, s.out_features] for s in lidb.layers],
                             separators=(",", ":")),
        "a": str(c.a), "b": str(c.b), "rank": str(c.rank), "seed": str(c.seed),
        "aux_generator": aux_bases.GENERATOR_VERSION,
        "aux_checksum": lidb.aux_checksum(),
        "arch": describe(lidb.layers, lidb.info.get("family")),
        "created_by": PACK_NAME,
    }
    for k in INFO_KEYS:
        if k != "family" or lidb.info.get(k):     # UNet LiDBs stay byte-identical to earlier versions
            meta[k] = str(lidb.info.get(k, ""))
    if free:
        meta.update(relaxation=lidb.relaxation, free_rank=str(lidb.free_rank))
    return tensors, meta


def save_lidb(lidb: LiDB, path: str) -> str:
    """Write a LiDB atomically (temp file, then rename). Refuses NaN/Inf weights."""
    if not lidb.is_finite():
        raise HDBError("This LiDB contains NaN or Inf values and was not saved; re-run the step that made it "
                       "(for finetuning: lower the learning rate).")
    tensors, meta = lidb_to_safetensors(lidb)
    return write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


_fail = file_error


def _check_is_lidb(path: str):
    def check(meta):
        if meta.get("format") != FORMAT_NAME:
            raise _fail(path, "is a safetensors file but not a LiDB (it has no HyperDreamBooth metadata); "
                              "load LoRA files with LoraLoader instead.")
    return check


def load_lidb(path: str, progress=None) -> LiDB:
    """Read and validate a LiDB file; every problem becomes a one-sentence HDBError.

    `progress(done, total)` follows the aux bases' first build for this architecture.
    """
    meta, tensors = read(path, _check_is_lidb(path), "LiDB files in ComfyUI/models/lidb/", "save or download it again")
    return lidb_from_safetensors(tensors, meta, path, progress)


def lidb_from_safetensors(tensors: dict[str, torch.Tensor], meta: dict[str, str], path: str = "LiDB",
                          progress=None) -> LiDB:
    check_version(path, meta, "LiDB", FORMAT_VERSION)
    try:
        layers = tuple(LayerSpec(str(n), int(i), int(o)) for n, i, o in json.loads(meta["layers"]))
        config = LiDBConfig(a=int(meta["a"]), b=int(meta["b"]), rank=int(meta["rank"]), seed=int(meta["seed"]))
    except (KeyError, ValueError, TypeError) as e:
        raise _fail(path, f"has damaged LiDB metadata ({e}); save it again.") from None
    if config.rank < 1 or config.a < 1 or config.b < 1 or not layers:
        raise _fail(path, "has damaged LiDB metadata (empty layer list or zero rank); save it again.")

    a_train, b_train = {}, {}
    cursor: dict[str, int] = {}
    for spec in layers:
        key = _group_key(*config.layer_dims(spec))
        idx = cursor.get(key, 0)
        cursor[key] = idx + 1
        at, bt = tensors.get(f"a_train.{key}"), tensors.get(f"b_train.{key}")
        if at is None or bt is None or at.dim() != 3 or bt.dim() != 3 or idx >= at.shape[0] or idx >= bt.shape[0]:
            raise _fail(path, f"is missing the train matrices of layer {spec.name}; "
                              f"the file is damaged, save it again.")
        a_train[spec.name], b_train[spec.name] = at[idx].float(), bt[idx].float()
    expected = {f"{p}.{k}" for k in cursor for p in ("a_train", "b_train")}
    sizes_ok = all(tensors[f"a_train.{k}"].shape[0] == n and tensors[f"b_train.{k}"].shape[0] == n
                   for k, n in cursor.items())
    free_down, free_up = {}, {}
    if meta.get("relaxation") == FREE:
        free_cursor: dict[str, int] = {}
        for spec in layers:
            key = _group_key(spec.in_features, spec.out_features)
            idx = free_cursor.get(key, 0)
            free_cursor[key] = idx + 1
            down, up = tensors.get(f"free_down.{key}"), tensors.get(f"free_up.{key}")
            if down is None or up is None or down.dim() != 3 or up.dim() != 3 or idx >= min(len(down), len(up)):
                raise _fail(path, f"is missing the free LoRA factors of layer {spec.name}; the file is damaged, "
                                  f"save it again.")
            free_down[spec.name], free_up[spec.name] = down[idx].float(), up[idx].float()
        expected |= {f"{p}.{k}" for k in free_cursor for p in ("free_down", "free_up")}
        sizes_ok = sizes_ok and all(len(tensors[f"free_down.{k}"]) == n and len(tensors[f"free_up.{k}"]) == n
                                    for k, n in free_cursor.items())
    if set(tensors) != expected or not sizes_ok:
        raise _fail(path, "has tensors that do not match its layer list; the file is damaged, save it again.")
    info = {k: meta[k] for k in INFO_KEYS if meta.get(k)}
    try:
        lidb = LiDB(layers, config, a_train, b_train, info, free_down, free_up)
    except ValueError as e:
        raise _fail(path, f"has inconsistent shapes ({e}); the file is damaged, save it again.") from None
    if not lidb.is_finite():
        raise _fail(path, "contains NaN or Inf values; it came from a diverged run, make it again "
                          "(for finetuning: lower the learning rate).")
    stored = meta.get("aux_checksum", "")
    actual = lidb.aux_checksum(progress)
    if stored != actual:
        raise _fail(path, f"cannot be reproduced here: its aux-basis checksum {stored!r} differs from the "
                          f"regenerated {actual!r}; the file is damaged or was edited, make it again.")
    return lidb
