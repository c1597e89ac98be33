"""Many LiDBs of one layout as tensors: stacking, unstacking, and their LoRA factors.

Training handles N identities at once (stage 0 trains a chunk of them, stage 1 predicts
a batch): their train matrices are stacked on a leading dimension, and the factors
that reach the injector are computed for the whole stack with batched matmuls.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from hdb_core.errors import HDBError
from hdb_core.lidb.targets import LayerSpec
from hdb_core.lidb.weights import (LiDB, LiDBConfig, aux_for_layers, aux_shape_groups, down_up_from,
                                   grouped_down_up)

Train = Mapping[str, torch.Tensor]


def stack_train(lidbs: Sequence[LiDB], device=None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """N LiDBs of one layout as {name: A [N, a_l, r]}, {name: B [N, r, b_l]} (float32)."""
    if not lidbs:
        raise ValueError("no LiDBs to stack")
    first = lidbs[0]
    for other in lidbs[1:]:
        if other.layers != first.layers or other.config != first.config:
            raise HDBError("These LiDBs were made for different models or settings and cannot be batched; "
                           "make them all with the same base model, a, b, rank and seed.")
    a = {s.name: torch.stack([x.a_train[s.name].float() for x in lidbs]).to(device) for s in first.layers}
    b = {s.name: torch.stack([x.b_train[s.name].float() for x in lidbs]).to(device) for s in first.layers}
    return a, b


def unstack_train(a: Train, b: Train, layers: Sequence[LayerSpec], config: LiDBConfig, **info) -> list[LiDB]:
    """The inverse of `stack_train`: one detached float32 CPU LiDB per batch row."""
    n = next(iter(a.values())).shape[0]
    return [LiDB(tuple(layers), config,
                 {s.name: a[s.name][i].detach().float().cpu().clone() for s in layers},
                 {s.name: b[s.name][i].detach().float().cpu().clone() for s in layers}, dict(info))
            for i in range(n)]


class LayerFactors:
    """Every layer's LoRA factors from its train matrices, the aux bases held on the device.

    `grouped` builds them per group of same-shaped layers (`grouped_down_up`); by default it does
    so off the CPU, where each small op is a kernel launch and results are not bit-reproducible
    anyway. On the CPU the per-layer build is faster, keeps a relaxed start's dW bit for bit, and
    keeps the arithmetic the evidence bench was measured with. Train matrices may be one LiDB's
    or stacked over identities (`stack_train`); the factors are differentiable in them.
    """

    def __init__(self, config: LiDBConfig, layers: Sequence[LayerSpec], device, grouped: bool | None = None):
        self.grouped = torch.device(device).type != "cpu" if grouped is None else grouped
        self.names = [s.name for s in layers]
        aux = aux_for_layers(config, layers)
        on_cpu = [aux[name] for name in self.names]
        if self.grouped:
            self.groups = [(idx, a.to(device), b.to(device)) for idx, a, b in aux_shape_groups(on_cpu)]
        else:
            self.per_layer = [(a.to(device), b.to(device)) for a, b in on_cpu]

    def __call__(self, a_train: Sequence[torch.Tensor],
                 b_train: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(down [..., r, in], up [..., out, r]) of each layer, in layer order."""
        a_train, b_train = [a.float() for a in a_train], [b.float() for b in b_train]
        if self.grouped:
            return grouped_down_up(self.groups, a_train, b_train)
        return [down_up_from(a_aux, b_aux, a, b) for (a_aux, b_aux), a, b in zip(self.per_layer, a_train, b_train)]

    def named(self, a_train: Train, b_train: Train) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{name: (down, up)} of {name: train matrix} mappings."""
        return dict(zip(self.names, self([a_train[n] for n in self.names], [b_train[n] for n in self.names])))


def lidb_factors(lidbs: LiDB | Sequence[LiDB], device=None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Factors of one LiDB (shared by every sample) or of one LiDB per sample, in batch order."""
    if isinstance(lidbs, LiDB):
        lidbs = [lidbs]
    if any(x.free_down for x in lidbs):    # a free LoRA part: each LiDB's complete factors, stacked
        return {s.name: tuple(torch.stack(f).to(device) for f in zip(*(x.down_up(s.name) for x in lidbs)))
                for s in lidbs[0].layers}
    a, b = stack_train(list(lidbs), device)
    return LayerFactors(lidbs[0].config, lidbs[0].layers, device or "cpu").named(a, b)
