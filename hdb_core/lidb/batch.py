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
from hdb_core.lidb.weights import LiDB, LiDBConfig, aux_for_layers, down_up_from

Train = Mapping[str, torch.Tensor]
Aux = Mapping[str, tuple[torch.Tensor, torch.Tensor]]


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


def train_factors(aux: Aux, a_train: Train, b_train: Train) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{name: (down, up)} of (stacked) train matrices; differentiable in them, aux on their device."""
    out = {}
    for name, at in a_train.items():
        a_aux, b_aux = aux[name]
        out[name] = down_up_from(a_aux.to(at.device), b_aux.to(at.device), at.float(), b_train[name].float())
    return out


def lidb_factors(lidbs: LiDB | Sequence[LiDB], device=None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Factors of one LiDB (shared by every sample) or of one LiDB per sample, in batch order."""
    if isinstance(lidbs, LiDB):
        lidbs = [lidbs]
    if any(x.free_down for x in lidbs):    # a free LoRA part: each LiDB's complete factors, stacked
        return {s.name: tuple(torch.stack(f).to(device) for f in zip(*(x.down_up(s.name) for x in lidbs)))
                for s in lidbs[0].layers}
    a, b = stack_train(list(lidbs), device)
    return train_factors(aux_for_layers(lidbs[0].config, lidbs[0].layers), a, b)
