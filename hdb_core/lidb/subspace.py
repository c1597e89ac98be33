"""An identity subspace: the mean and top principal directions of many identities' LiDBs.

Identity LoRAs lie close to a low-dimensional linear space (weights2weights, Dravid
et al. 2024). Fit to the stage-0 LiDBs a hypernetwork was trained on, the mean plus
k directions hold, for a person none of them is of, a LiDB that identifies them:
finetuning only the k coefficients from one photo does (docs/evidence.md), where
projecting a freely finetuned LiDB onto the same directions does not.

A row is one LiDB's train matrices flattened (every layer's A_train, then every
layer's B_train, in layer order). Directions are stored times their spread (the
targets' standard deviation along them), so a coefficient of 1 is one typical
identity's worth of movement and one learning rate suits every direction.

File: tensors `mean` [D], `directions` [k, D] (float32); metadata format,
format_version, layers, a, b, rank, seed, aux_generator, identities, variance.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Sequence

import torch
from safetensors.torch import save_file

from hdb_core.atomic import write_atomic
from hdb_core.errors import HDBError
from hdb_core.lidb import aux_bases
from hdb_core.lidb.batch import stack_train
from hdb_core.lidb.file import load_lidb
from hdb_core.lidb.targets import LayerSpec
from hdb_core.lidb.weights import LiDB, LiDBConfig
from hdb_core.storage import check_version, file_error, read

FORMAT_NAME = "hyperdreambooth.identity_subspace"
FORMAT_VERSION = 1
EXACT_SVD_LIMIT = 4096      # above this many identities (and row width) the SVD is randomised


@dataclass(frozen=True)
class IdentitySubspace:
    layers: tuple[LayerSpec, ...]
    config: LiDBConfig
    mean: torch.Tensor                  # [D]
    directions: torch.Tensor            # [k, D], each principal direction times its spread
    info: dict = field(default_factory=dict)

    @property
    def components(self) -> int:
        return self.directions.shape[0]

    @classmethod
    def fit(cls, lidbs: Sequence[LiDB], components: int) -> "IdentitySubspace":
        """The mean and top `components` principal directions of `lidbs` (at most one fewer than there are)."""
        if len(lidbs) < 2:
            raise HDBError(f"An identity subspace needs the LiDBs of at least 2 identities; got {len(lidbs)}.")
        return cls.fit_rows(rows_of(lidbs), lidbs[0].layers, lidbs[0].config, components)

    @classmethod
    def fit_rows(cls, rows: torch.Tensor, layers: Sequence[LayerSpec], config: LiDBConfig,
                 components: int) -> "IdentitySubspace":
        """`fit` on LiDBs already laid out as rows [N, D] (consumed: centred in place)."""
        n = rows.shape[0]
        if n < 2:
            raise HDBError(f"An identity subspace needs the LiDBs of at least 2 identities; got {n}.")
        if components < 1:
            raise HDBError(f"components is {components}; use 1 or more (128 is a good value).")
        k = min(components, n - 1, rows.shape[1])
        exact = min(rows.shape) <= EXACT_SVD_LIMIT
        rows = rows.double() if exact else rows.float()       # thousands of identities: float32, randomised
        mean = rows.mean(0)
        centred = rows.sub_(mean)
        if exact:
            _, singular, basis = torch.linalg.svd(centred, full_matrices=False)
        else:
            _, singular, v = torch.svd_lowrank(centred, q=min(k + 16, *centred.shape), niter=6)
            basis = v.T
        spread = singular[:k] / (n - 1) ** 0.5
        variance = float((singular[:k].double() ** 2).sum() / centred.double().pow(2).sum().clamp_min(1e-30))
        return cls(tuple(layers), config, mean.float(), (spread[:, None] * basis[:k]).float(),
                   {"identities": n, "variance": round(variance, 4)})

    def check_fits(self, lidb: LiDB) -> None:
        if lidb.free_down:
            raise HDBError("This LiDB has a free LoRA part (it was finetuned with relaxation free_lora), which an "
                           "identity subspace cannot move; start from the hypernetwork's prediction instead.")
        if tuple(lidb.layers) != tuple(self.layers) or lidb.config != self.config:
            raise HDBError("This identity subspace was fit to LiDBs of another model or other a/b/rank/seed "
                           "settings; use the subspace made with the hypernetwork that predicted this LiDB.")

    def train_matrices(self, rows: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        return split_rows(rows, self.layers, self.config)

    def lidb(self, row: torch.Tensor, **info) -> LiDB:
        a, b = self.train_matrices(row.detach().float().cpu().reshape(1, -1))
        return LiDB(self.layers, self.config, {k: v[0] for k, v in a.items()}, {k: v[0] for k, v in b.items()},
                    dict(info))


def rows_of(lidbs: Sequence[LiDB]) -> torch.Tensor:
    """[N, D] float32: each LiDB's train matrices as one row (the subspace's layout)."""
    a, b = stack_train(list(lidbs))
    return torch.cat([v.flatten(1) for v in [*a.values(), *b.values()]], 1)


def row_width(layers: Sequence[LayerSpec], config: LiDBConfig) -> int:
    """D: the numbers in one row of `rows_of` (every layer's A_train and B_train)."""
    return sum(sum(config.layer_dims(s)) * config.rank for s in layers)


def split_rows(rows: torch.Tensor, layers: Sequence[LayerSpec],
               config: LiDBConfig) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The inverse of `rows_of`: rows [N, D] as stacked {name: A_train [N, a_l, r]}, {name: B_train [N, r, b_l]};
    differentiable."""
    shapes = [("a", s.name, (config.layer_dims(s)[0], config.rank)) for s in layers]
    shapes += [("b", s.name, (config.rank, config.layer_dims(s)[1])) for s in layers]
    parts = rows.split([a * b for _, _, (a, b) in shapes], dim=1)
    out: dict[str, dict[str, torch.Tensor]] = {"a": {}, "b": {}}
    for (kind, name, shape), part in zip(shapes, parts):
        out[kind][name] = part.reshape(-1, *shape)
    return out["a"], out["b"]


def fit_folder(folder: str, components: int, progress: bool = True) -> IdentitySubspace:
    """The subspace of a stage-0 output folder, read one LiDB at a time (15K of them fit in memory)."""
    from tqdm.auto import tqdm

    if not os.path.isdir(folder):
        raise HDBError(f"The LiDB folder '{folder}' does not exist; pass the output folder of "
                       f"`hdb preoptimize` (in a pipeline run: <run>/lidbs).")
    names = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if len(names) < 2:
        raise HDBError(f"The LiDB folder '{folder}' holds {len(names)} LiDB file(s); an identity subspace "
                       f"needs the stage-0 LiDBs of at least 2 identities.")
    first = load_lidb(os.path.join(folder, names[0]))
    rows = torch.empty(len(names), row_width(first.layers, first.config))
    for i, name in enumerate(tqdm(names, desc="identity subspace", unit="LiDB", disable=not progress)):
        lidb = first if i == 0 else load_lidb(os.path.join(folder, name))
        if lidb.layers != first.layers or lidb.config != first.config:
            raise HDBError(f"'{name}' was made for another model or other a/b/rank/seed settings than "
                           f"'{names[0]}'; fit a subspace to the LiDBs of one stage-0 run.")
        rows[i] = rows_of([lidb])[0]
    return IdentitySubspace.fit_rows(rows, first.layers, first.config, components)


def save_subspace(subspace: IdentitySubspace, path: str) -> str:
    c = subspace.config
    meta = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION),
            "layers": json.dumps([[s.name, s.in_features, s.out_features] for s in subspace.layers],
                                 separators=(",", ":")),
            "a": str(c.a), "b": str(c.b), "rank": str(c.rank), "seed": str(c.seed),
            "aux_generator": aux_bases.GENERATOR_VERSION,
            **{k: str(v) for k, v in subspace.info.items()}}
    tensors = {"mean": subspace.mean.contiguous(), "directions": subspace.directions.contiguous()}
    return write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_subspace(path: str) -> IdentitySubspace:
    def check(meta):
        if meta.get("format") != FORMAT_NAME:
            raise file_error(path, "is not an identity subspace (no HyperDreamBooth subspace metadata); "
                                   "make one with 'hdb fit-subspace'.")

    meta, tensors = read(path, check, "identity subspaces made by 'hdb fit-subspace' next to their hypernetwork",
                         "make it again with 'hdb fit-subspace'")
    check_version(path, meta, "identity subspace", FORMAT_VERSION)
    try:
        layers = tuple(LayerSpec(str(n), int(i), int(o)) for n, i, o in json.loads(meta["layers"]))
        config = LiDBConfig(a=int(meta["a"]), b=int(meta["b"]), rank=int(meta["rank"]), seed=int(meta["seed"]))
        mean, directions = tensors["mean"].float(), tensors["directions"].float()
    except (KeyError, ValueError, TypeError) as e:
        raise file_error(path, f"has damaged identity-subspace data ({e}); make it again.") from None
    width = row_width(layers, config)
    if mean.shape != (width,) or directions.dim() != 2 or directions.shape[1] != width:
        raise file_error(path, "has tensors that do not match its layer list; the file is damaged, make it again.")
    if not (torch.isfinite(mean).all() and torch.isfinite(directions).all()):
        raise file_error(path, "contains NaN or Inf values; make it again.")
    info = {k: meta[k] for k in ("identities", "variance") if k in meta}
    return IdentitySubspace(layers, config, mean, directions, info)
