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

import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Mapping, Sequence

import torch

from hdb_core.lidb import aux_bases
from hdb_core.lidb.targets import LayerSpec, describe

SOURCES = ("predicted", "finetuned", "trained", "converted", "random")


AUX = "aux_subspace"   # rank relaxation inside the aux bases (new A/B_train components): the small file
FREE = "free_lora"     # the paper's: the start kept as is, plus a free LoRA of higher rank
RELAXATIONS = (AUX, FREE)


@dataclass(frozen=True)
class LiDBConfig:
    a: int = 100
    b: int = 50
    rank: int = 1
    seed: int = 0

    def layer_dims(self, spec: LayerSpec) -> tuple[int, int]:
        return min(self.a, spec.in_features), min(self.b, spec.out_features)


# -- aux bases cache -----------------------------------------------------------------------------
# Aux bases are pure functions of (seed, layer, shape) and cost seconds to build for a full model,
# so they are cached per process: whole layouts at once (one batch per basis shape), least recently
# used first out, within a byte budget (SDXL's 736 layers hold ~0.6 GB of float32 bases).

DEFAULT_AUX_CACHE_BYTES = 1 << 30

AuxKey = tuple[int, str, int, int, int, int]  # seed, layer name, in, out, a_l, b_l
Progress = Callable[[int, int], None]


class _AuxCache:
    def __init__(self, budget: int):
        self.budget = budget
        self.nbytes = 0
        self.entries: OrderedDict[AuxKey, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.lock = threading.RLock()

    @staticmethod
    def size(key: AuxKey) -> int:
        _, _, in_f, out_f, a_l, b_l = key
        return 4 * (in_f * a_l + b_l * out_f)

    def get(self, key: AuxKey):
        pair = self.entries.get(key)
        if pair is not None:
            self.entries.move_to_end(key)
        return pair

    def put(self, key: AuxKey, pair) -> None:
        if key not in self.entries:
            self.nbytes += self.size(key)
        self.entries[key] = pair
        self.entries.move_to_end(key)

    def trim(self) -> None:
        """Drop least recently used entries (other layouts first) until within budget."""
        while self.nbytes > self.budget and self.entries:
            key, _ = self.entries.popitem(last=False)
            self.nbytes -= self.size(key)

    def clear(self) -> None:
        self.entries.clear()
        self.nbytes = 0


_AUX = _AuxCache(DEFAULT_AUX_CACHE_BYTES)


def _aux_key(config: LiDBConfig, spec: LayerSpec) -> AuxKey:
    a_l, b_l = config.layer_dims(spec)
    return int(config.seed), spec.name, spec.in_features, spec.out_features, a_l, b_l


def clear_aux_cache() -> None:
    """Forget every cached aux basis (they are rebuilt on demand)."""
    with _AUX.lock:
        _AUX.clear()


def set_aux_cache_budget(nbytes: int) -> int:
    """Bound the aux cache to nbytes (evicting now if needed); returns the previous budget."""
    with _AUX.lock:
        previous, _AUX.budget = _AUX.budget, int(nbytes)
        _AUX.trim()
        return previous


def aux_cache_info() -> dict[str, int]:
    with _AUX.lock:
        return {"bytes": _AUX.nbytes, "budget": _AUX.budget, "layers": len(_AUX.entries)}


def aux_for_layers(config: LiDBConfig, layers: Iterable[LayerSpec],
                   progress: Progress | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{name: (A_aux [in, a_l], B_aux [b_l, out])} float32 on the CPU for every layer.

    Layers not cached yet are built in one batch (all layers of a basis shape together);
    progress(done, total) follows that build. The cache then keeps this layout, dropping
    least recently used layers of other layouts if the budget requires it.
    """
    layers = list(layers)
    keys = [_aux_key(config, spec) for spec in layers]
    with _AUX.lock:  # held while building too: two callers never build the same layout twice
        found = {key: _AUX.get(key) for key in keys}
        missing = [key for key, pair in found.items() if pair is None]
        if missing:
            # Cached tensors outlive the call that builds them: ComfyUI runs nodes under inference
            # mode, and an inference tensor cached by ApplyLiDB could not be used by a later
            # finetune's backward.
            with torch.inference_mode(False):
                built = aux_bases.aux_pairs(int(config.seed), [key[1:] for key in missing], progress=progress)
            found.update(zip(missing, built, strict=True))
        for key in keys:  # this layout becomes the most recently used
            _AUX.put(key, found[key])
        _AUX.trim()
    return {spec.name: found[key] for spec, key in zip(layers, keys, strict=True)}


def aux_for(config: LiDBConfig, spec: LayerSpec,
            layout: Iterable[LayerSpec] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_aux [in, a_l], B_aux [b_l, out]) float32 on the CPU; cached per process.

    On a miss, `layout` (the layer list spec belongs to) is built in one batch when it fits the
    cache budget, so that asking for its layers one by one costs one batched build.
    """
    key = _aux_key(config, spec)
    with _AUX.lock:
        pair = _AUX.get(key)
        if pair is not None:
            return pair
        group = [spec]
        if layout is not None:
            layout = list(layout)
            if sum(_AUX.size(_aux_key(config, s)) for s in layout) <= _AUX.budget:
                group = layout
        return aux_for_layers(config, group)[spec.name]


def aux_checksum(config: LiDBConfig, layers: Iterable[LayerSpec], progress: Progress | None = None) -> str:
    """Checksum of every layer's aux bases, stored in files and checked on load."""
    layers = list(layers)
    aux = aux_for_layers(config, layers, progress)
    return aux_bases.checksum(t for spec in layers for t in aux[spec.name])


def down_up_from(a_aux, b_aux, a_train, b_train) -> tuple[torch.Tensor, torch.Tensor]:
    """The LoRA factors of one layer; differentiable in a_train and b_train."""
    # One rank component at a time: component k is then computed identically whatever the
    # rank, so relaxing a LiDB (appending components) leaves its existing dW bit-identical.
    r = a_train.shape[-1]
    down = torch.cat([a_aux @ a_train[..., k:k + 1] for k in range(r)], dim=-1).transpose(-1, -2)  # [r, in]
    up = torch.cat([b_train[..., k:k + 1, :] @ b_aux for k in range(r)], dim=-2).transpose(-1, -2)  # [out, r]
    return down, up


AuxGroup = tuple[list[int], torch.Tensor, torch.Tensor]


def aux_shape_groups(aux: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[AuxGroup]:
    """Layers (by position) whose aux bases have one shape, with those bases stacked [L, ...]."""
    by_shape: dict[tuple, list[int]] = {}
    for i, (a_aux, b_aux) in enumerate(aux):
        by_shape.setdefault((tuple(a_aux.shape), tuple(b_aux.shape)), []).append(i)
    return [(idx, torch.stack([aux[i][0] for i in idx]), torch.stack([aux[i][1] for i in idx]))
            for idx in by_shape.values()]


def grouped_down_up(groups: Sequence[AuxGroup], a_train: Sequence[torch.Tensor],
                    b_train: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`down_up_from` of every layer, one batched matmul per shape group and rank component.

    Each layer's train matrices are [a_l, r] / [r, b_l], or stacked over identities with any
    leading dimensions (stage 0 trains many at once), the same for every layer.

    A few hundred ops for a whole model instead of about 70 per layer (forward and backward,
    bench/factor_cost.py), for devices where each op is a kernel launch. Equal to the per-layer
    result up to rounding, not bit for bit.
    """
    out: list = [None] * len(a_train)
    for idx, a_aux, b_aux in groups:
        a, b = torch.stack([a_train[i] for i in idx]), torch.stack([b_train[i] for i in idx])
        batch = (1,) * (a.dim() - 3)     # train matrices stacked over identities: [L, N, a_l, r]
        down, up = down_up_from(a_aux.view(len(idx), *batch, *a_aux.shape[1:]),
                                b_aux.view(len(idx), *batch, *b_aux.shape[1:]), a, b)
        for i, d, u in zip(idx, down.unbind(0), up.unbind(0)):
            out[i] = (d, u)
    return out


@dataclass
class LiDB:
    """One identity: train matrices for every target layer plus how they were made.

    `info` holds free-form provenance that travels in the file: trigger phrase,
    source (predicted / finetuned / trained / converted), base-model hint.

    `free_down`/`free_up` (optional, every layer or none) are the paper's rank relaxation:
    a plain LoRA of rank `free_rank` beside the aux-factored part, outside the aux bases'
    subspace, so dW = up_aux @ down_aux + free_up @ free_down.
    """

    layers: tuple[LayerSpec, ...]
    config: LiDBConfig
    a_train: dict[str, torch.Tensor]
    b_train: dict[str, torch.Tensor]
    info: dict[str, str] = field(default_factory=dict)
    free_down: dict[str, torch.Tensor] = field(default_factory=dict)    # [free_rank, in]
    free_up: dict[str, torch.Tensor] = field(default_factory=dict)      # [out, free_rank]

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
        if self.free_down or self.free_up:
            if set(self.free_down) != set(names) or set(self.free_up) != set(names):
                raise ValueError("a LiDB's free LoRA part must cover every layer")
            rf = self.free_rank
            for spec in self.layers:
                down, up = self.free_down[spec.name], self.free_up[spec.name]
                if tuple(down.shape) != (rf, spec.in_features) or tuple(up.shape) != (spec.out_features, rf):
                    raise ValueError(f"layer {spec.name}: free LoRA factors are {tuple(down.shape)}/"
                                     f"{tuple(up.shape)}, expected {(rf, spec.in_features)}/"
                                     f"{(spec.out_features, rf)}")

    @property
    def free_rank(self) -> int:
        """Rank of the free LoRA part (0: none, all of dW lies in the aux subspace)."""
        return next(iter(self.free_down.values())).shape[0] if self.free_down else 0

    @property
    def relaxation(self) -> str:
        return FREE if self.free_down else AUX

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
        """A zero-residual start that can still learn: A_train random, B_train zero (as LoRA does).

        Layers draw in name order, so the start does not depend on the order in which a model
        lists them (diffusers and ComfyUI list UNet blocks differently).
        """
        lidb = cls.zeros(layers, config, **info)
        for spec in sorted(lidb.layers, key=lambda s: s.name):
            a_l, _ = config.layer_dims(spec)
            lidb.a_train[spec.name] = torch.randn(a_l, config.rank, generator=generator) / a_l ** 0.5
        return lidb

    # -- maths ----------------------------------------------------------------------------
    @property
    def spec_by_name(self) -> dict[str, LayerSpec]:
        return {s.name: s for s in self.layers}

    def aux(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's aux bases; the first call builds those of every layer in one batch."""
        return aux_for(self.config, self.spec_by_name[name], layout=self.layers)

    def down_up(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(down [r, in], up [out, r]) in float32 on the CPU; r includes the free part's rank."""
        a_aux, b_aux = self.aux(name)
        down, up = down_up_from(a_aux, b_aux, self.a_train[name].float().cpu(), self.b_train[name].float().cpu())
        if self.free_down:
            down = torch.cat([down, self.free_down[name].float().cpu()], dim=0)
            up = torch.cat([up, self.free_up[name].float().cpu()], dim=1)
        return down, up

    def delta(self, name: str) -> torch.Tensor:
        down, up = self.down_up(name)
        return up @ down

    def aux_checksum(self, progress: Progress | None = None) -> str:
        return aux_checksum(self.config, self.layers, progress)

    def _tensors(self):
        return (*self.a_train.values(), *self.b_train.values(), *self.free_down.values(), *self.free_up.values())

    @property
    def num_trainable(self) -> int:
        return sum(t.numel() for t in self._tensors())

    def is_finite(self) -> bool:
        return all(torch.isfinite(t).all() for t in self._tensors())

    def describe(self) -> str:
        return describe(self.layers)

    # -- derived LiDBs (never mutate self) --------------------------------------------------
    def with_info(self, **info) -> "LiDB":
        return replace(self, a_train=dict(self.a_train), b_train=dict(self.b_train), info={**self.info, **info},
                       free_down=dict(self.free_down), free_up=dict(self.free_up))

    def with_tensors(self, a_train: Mapping[str, torch.Tensor], b_train: Mapping[str, torch.Tensor],
                     rank: int | None = None, free: tuple[Mapping, Mapping] | None = None, **info) -> "LiDB":
        """New train matrices (and free factors, if given; else this LiDB's) with the same layers."""
        config = self.config if rank is None else replace(self.config, rank=rank)
        free_down, free_up = free if free is not None else (self.free_down, self.free_up)
        return LiDB(self.layers, config, dict(a_train), dict(b_train), {**self.info, **info},
                    dict(free_down), dict(free_up))

    def components(self, keep: Iterable[str]) -> "LiDB":
        """The part of this LiDB on the given components ('unet', 'te', 'te1', 'te2')."""
        keep = set(keep)
        layers = tuple(s for s in self.layers if s.component in keep)
        pick = lambda d: {s.name: d[s.name] for s in layers} if d else {}    # noqa: E731
        return LiDB(layers, self.config, pick(self.a_train), pick(self.b_train), dict(self.info),
                    pick(self.free_down), pick(self.free_up))

    def with_free_lora(self, rank: int, generator: torch.Generator) -> "LiDB":
        """This LiDB plus a free LoRA of `rank` per layer (down random, up zero: dW unchanged).

        The paper's relaxation: the start stays as it is, the new rank lives outside the aux
        subspace. Layers draw in name order.
        """
        if self.free_down:
            raise ValueError("this LiDB already has a free LoRA part")
        down, up = {}, {}
        for spec in sorted(self.layers, key=lambda s: s.name):
            down[spec.name] = torch.randn(rank, spec.in_features, generator=generator) / spec.in_features ** 0.5
            up[spec.name] = torch.zeros(spec.out_features, rank)
        return self.with_tensors(self.a_train, self.b_train, free=(down, up))

    def relaxed(self, rank: int, generator: torch.Generator) -> "LiDB":
        """Rank-`rank` LiDB whose dW equals this one's exactly.

        The existing components are kept as the first columns/rows; new components
        get a random A_train column and a zero B_train row, so they add nothing until
        trained but receive gradients from the first step. Layers draw in name order.
        """
        r0 = self.config.rank
        if rank < r0:
            raise ValueError(f"cannot relax a rank-{r0} LiDB to the lower rank {rank}")
        a_new, b_new = {}, {}
        for spec in sorted(self.layers, key=lambda s: s.name):
            at, bt = self.a_train[spec.name].float(), self.b_train[spec.name].float()
            a_l, b_l = at.shape[0], bt.shape[1]
            extra = torch.randn(a_l, rank - r0, generator=generator) / a_l ** 0.5
            a_new[spec.name] = torch.cat([at, extra], dim=1)
            b_new[spec.name] = torch.cat([bt, torch.zeros(rank - r0, b_l)], dim=0)
        return self.with_tensors(a_new, b_new, rank=rank)

    def to_float32(self) -> "LiDB":
        f32 = lambda d: {k: v.detach().float().cpu().clone() for k, v in d.items()}    # noqa: E731
        return self.with_tensors(f32(self.a_train), f32(self.b_train), free=(f32(self.free_down), f32(self.free_up)))
