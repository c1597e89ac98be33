"""The LiDB weight set: rank-r LoRA residuals factored through frozen aux bases.

For a Linear with weight W [out, in] the residual is

    down = (A_aux @ A_train)^T   [r, in]      A_aux [in, a] frozen, A_train [a, r] learned
    up   = (B_train @ B_aux)^T   [out, r]     B_aux [b, out] frozen, B_train [r, b] learned
    dW   = up @ down

(Ruiz et al., HyperDreamBooth, sec. 4.1). Only A_train and B_train are stored;
the aux bases are rebuilt from (seed, layer name, shape) by `aux_bases`.
Where a layer is narrower than a or b (tiny test models), that layer uses
a_l = min(a, in) and b_l = min(b, out) so the bases stay orthogonal.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from typing import Iterable, Mapping

import torch

from . import aux_bases
from .targets import LayerSpec, describe

SOURCES = ("predicted", "finetuned", "trained", "converted", "random")


@dataclass(frozen=True)
class LiDBConfig:
    a: int = 100
    b: int = 50
    rank: int = 1
    seed: int = 0

    def layer_dims(self, spec: LayerSpec) -> tuple[int, int]:
        return min(self.a, spec.in_features), min(self.b, spec.out_features)


@functools.lru_cache(maxsize=4096)
def _cached_aux(seed: int, name: str, in_f: int, out_f: int, a_l: int, b_l: int):
    # The cache outlives the call that fills it: ComfyUI runs nodes under inference mode, and an
    # inference tensor cached by ApplyLiDB could not be used by a later finetune's backward.
    with torch.inference_mode(False):
        return aux_bases.aux_pair(seed, name, in_f, out_f, a_l, b_l)


def aux_for(config: LiDBConfig, spec: LayerSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_aux [in, a_l], B_aux [b_l, out]) float32 on the CPU; cached per process."""
    a_l, b_l = config.layer_dims(spec)
    return _cached_aux(int(config.seed), spec.name, spec.in_features, spec.out_features, a_l, b_l)


def aux_checksum(config: LiDBConfig, layers: Iterable[LayerSpec]) -> str:
    """Checksum of every layer's aux bases, stored in files and checked on load."""
    def gen():
        for spec in layers:
            a_aux, b_aux = aux_for(config, spec)
            yield a_aux
            yield b_aux
    return aux_bases.checksum(gen())


def down_up_from(a_aux, b_aux, a_train, b_train) -> tuple[torch.Tensor, torch.Tensor]:
    """The LoRA factors of one layer; differentiable in a_train and b_train."""
    # One rank component at a time: component k is then computed identically whatever the
    # rank, so relaxing a LiDB (appending components) leaves its existing dW bit-identical.
    r = a_train.shape[-1]
    down = torch.cat([a_aux @ a_train[..., k:k + 1] for k in range(r)], dim=-1).transpose(-1, -2)  # [r, in]
    up = torch.cat([b_train[..., k:k + 1, :] @ b_aux for k in range(r)], dim=-2).transpose(-1, -2)  # [out, r]
    return down, up


@dataclass
class LiDB:
    """One identity: train matrices for every target layer plus how they were made.

    `info` holds free-form provenance that travels in the file: trigger phrase,
    source (predicted / finetuned / trained / converted), base-model hint.
    """

    layers: tuple[LayerSpec, ...]
    config: LiDBConfig
    a_train: dict[str, torch.Tensor]
    b_train: dict[str, torch.Tensor]
    info: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        self.layers = tuple(self.layers)
        names = [s.name for s in self.layers]
        if len(set(names)) != len(names):
            raise ValueError("duplicate layer names in LiDB")
        r = self.config.rank
        for spec in self.layers:
            a_l, b_l = self.config.layer_dims(spec)
            at, bt = self.a_train.get(spec.name), self.b_train.get(spec.name)
            if at is None or bt is None:
                raise ValueError(f"LiDB has no train matrices for layer {spec.name}")
            if tuple(at.shape) != (a_l, r) or tuple(bt.shape) != (r, b_l):
                raise ValueError(f"layer {spec.name}: train matrices are {tuple(at.shape)}/{tuple(bt.shape)}, "
                                 f"expected {(a_l, r)}/{(r, b_l)}")
        if set(self.a_train) != set(names) or set(self.b_train) != set(names):
            raise ValueError("LiDB train matrices name layers that are not in its layer list")

    # -- construction -----------------------------------------------------------------
    @classmethod
    def zeros(cls, layers: Iterable[LayerSpec], config: LiDBConfig, **info) -> "LiDB":
        layers = tuple(layers)
        a_train, b_train = {}, {}
        for spec in layers:
            a_l, b_l = config.layer_dims(spec)
            a_train[spec.name] = torch.zeros(a_l, config.rank)
            b_train[spec.name] = torch.zeros(config.rank, b_l)
        return cls(layers, config, a_train, b_train, dict(info))

    @classmethod
    def trainable_start(cls, layers: Iterable[LayerSpec], config: LiDBConfig, generator: torch.Generator,
                        **info) -> "LiDB":
        """A zero-residual start that can still learn: A_train random, B_train zero (as LoRA does)."""
        lidb = cls.zeros(layers, config, **info)
        for spec in lidb.layers:
            a_l, _ = config.layer_dims(spec)
            lidb.a_train[spec.name] = torch.randn(a_l, config.rank, generator=generator) / a_l ** 0.5
        return lidb

    # -- maths ----------------------------------------------------------------------------
    @property
    def spec_by_name(self) -> dict[str, LayerSpec]:
        return {s.name: s for s in self.layers}

    def aux(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return aux_for(self.config, self.spec_by_name[name])

    def down_up(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(down [r, in], up [out, r]) in float32 on the CPU."""
        a_aux, b_aux = self.aux(name)
        return down_up_from(a_aux, b_aux, self.a_train[name].float().cpu(), self.b_train[name].float().cpu())

    def delta(self, name: str) -> torch.Tensor:
        down, up = self.down_up(name)
        return up @ down

    def aux_checksum(self) -> str:
        return aux_checksum(self.config, self.layers)

    @property
    def num_trainable(self) -> int:
        return sum(t.numel() for t in self.a_train.values()) + sum(t.numel() for t in self.b_train.values())

    def is_finite(self) -> bool:
        return all(torch.isfinite(t).all() for t in (*self.a_train.values(), *self.b_train.values()))

    def describe(self) -> str:
        return describe(self.layers)

    # -- derived LiDBs (never mutate self) --------------------------------------------------
    def with_info(self, **info) -> "LiDB":
        return replace(self, a_train=dict(self.a_train), b_train=dict(self.b_train), info={**self.info, **info})

    def with_tensors(self, a_train: Mapping[str, torch.Tensor], b_train: Mapping[str, torch.Tensor],
                     rank: int | None = None, **info) -> "LiDB":
        config = self.config if rank is None else replace(self.config, rank=rank)
        return LiDB(self.layers, config, dict(a_train), dict(b_train), {**self.info, **info})

    def components(self, keep: Iterable[str]) -> "LiDB":
        """The part of this LiDB on the given components ('unet', 'te', 'te1', 'te2')."""
        keep = set(keep)
        layers = tuple(s for s in self.layers if s.component in keep)
        return LiDB(layers, self.config, {s.name: self.a_train[s.name] for s in layers},
                    {s.name: self.b_train[s.name] for s in layers}, dict(self.info))

    def relaxed(self, rank: int, generator: torch.Generator) -> "LiDB":
        """Rank-`rank` LiDB whose dW equals this one's exactly.

        The existing components are kept as the first columns/rows; new components
        get a random A_train column and a zero B_train row, so they add nothing until
        trained but receive gradients from the first step.
        """
        r0 = self.config.rank
        if rank < r0:
            raise ValueError(f"cannot relax a rank-{r0} LiDB to the lower rank {rank}")
        a_new, b_new = {}, {}
        for spec in self.layers:
            at, bt = self.a_train[spec.name].float(), self.b_train[spec.name].float()
            a_l, b_l = at.shape[0], bt.shape[1]
            extra = torch.randn(a_l, rank - r0, generator=generator) / a_l ** 0.5
            a_new[spec.name] = torch.cat([at, extra], dim=1)
            b_new[spec.name] = torch.cat([bt, torch.zeros(rank - r0, b_l)], dim=0)
        return self.with_tensors(a_new, b_new, rank=rank)

    def to_float32(self) -> "LiDB":
        return self.with_tensors({k: v.detach().float().cpu().clone() for k, v in self.a_train.items()},
                                 {k: v.detach().float().cpu().clone() for k, v in self.b_train.items()})
