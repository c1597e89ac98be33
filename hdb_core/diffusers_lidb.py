"""LiDB residuals inside diffusers / transformers models, one LiDB per sample.

Every target Linear (attention q/k/v/out projection of a UNet2DConditionModel or
a CLIPTextModel) keeps its place and weights; its forward is wrapped (kohya
style) to add

    y_i += scale * (x_i @ down_i^T) @ up_i^T      for every sample i of the batch

where (down_i, up_i) come from sample i's A_train/B_train through the frozen aux
bases (`lidb.down_up_from`). The per-sample factors are stacked on a leading
batch dimension and applied with batched matmuls, so a batch of N identities
costs one forward, not N: this is what makes stage-0 pre-optimisation of
thousands of identities affordable. A single LiDB (batch 1) broadcasts over any
batch, and a batch of N LiDBs tiles over a batch of k*N samples (classifier-free
guidance stacks [uncond; cond]).
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch

from .errors import HDBError
from .lidb import LiDB, LiDBConfig, aux_for, down_up_from
from .targets import LayerSpec, describe, find_attention_projections

TrainBatch = Mapping[str, torch.Tensor]


def model_layers(modules: Mapping[str, torch.nn.Module]) -> list[LayerSpec]:
    """Target layers of {component prefix: module}, e.g. {'unet': unet, 'te': text_encoder}."""
    layers = []
    for prefix, module in modules.items():
        for path, lin in find_attention_projections(module):
            layers.append(LayerSpec(f"{prefix}.{path}", lin.in_features, lin.out_features))
    return layers


def check_layers_match(wanted: Sequence[LayerSpec], available: Sequence[LayerSpec], what: str) -> None:
    """HDBError unless every wanted layer exists in the model with the same shape."""
    have = {s.name: s for s in available}
    missing = [s for s in wanted if s.name not in have]
    wrong = [s for s in wanted if s.name in have and have[s.name] != s]
    if missing or wrong:
        first = (missing or wrong)[0]
        why = "has no layer" if missing else "has a different shape for layer"
        raise HDBError(f"{what} was made for {describe(wanted)} but the base model is {describe(available)} "
                       f"(the model {why} {first.name}); use the base model it was trained on.")


def stack_train(lidbs: Sequence[LiDB]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Stack N LiDBs of one layout into {name: A [N, a_l, r]}, {name: B [N, r, b_l]} (float32, CPU)."""
    if not lidbs:
        raise ValueError("no LiDBs to stack")
    first = lidbs[0]
    for other in lidbs[1:]:
        if other.layers != first.layers or other.config != first.config:
            raise HDBError("These LiDBs were made for different models or settings and cannot be batched; "
                           "make them all with the same base model, a, b, rank and seed.")
    a = {s.name: torch.stack([l.a_train[s.name].float() for l in lidbs]) for s in first.layers}
    b = {s.name: torch.stack([l.b_train[s.name].float() for l in lidbs]) for s in first.layers}
    return a, b


def unstack_train(a: TrainBatch, b: TrainBatch, layers: Sequence[LayerSpec], config: LiDBConfig,
                  **info) -> list[LiDB]:
    """The inverse of `stack_train`: one detached float32 CPU LiDB per batch row."""
    n = next(iter(a.values())).shape[0]
    out = []
    for i in range(n):
        at = {s.name: a[s.name][i].detach().float().cpu().clone() for s in layers}
        bt = {s.name: b[s.name][i].detach().float().cpu().clone() for s in layers}
        out.append(LiDB(tuple(layers), config, at, bt, dict(info)))
    return out


class LiDBInjector:
    """Wraps the target projections of some modules and adds per-sample LiDB residuals.

    Use as a context manager (wrappers removed on exit, even on error) and call
    `set_train` / `set_lidb` before each forward. Nothing of the wrapped modules'
    parameters or state dict changes; gradients flow to whatever tensors were
    passed to `set_train`.
    """

    def __init__(self, modules: Mapping[str, torch.nn.Module], layers: Iterable[LayerSpec], config: LiDBConfig,
                 device: torch.device | str | None = None):
        self.modules = dict(modules)
        self.config = config
        self.layers = tuple(layers)
        available = model_layers(self.modules)
        check_layers_match(self.layers, available, "This LiDB layout")
        first = next(iter(self.modules.values()))
        self.device = torch.device(device) if device is not None else next(first.parameters()).device
        self._linears: dict[str, torch.nn.Linear] = {}
        for prefix, module in self.modules.items():
            for path, lin in find_attention_projections(module):
                self._linears[f"{prefix}.{path}"] = lin
        self._aux = {s.name: tuple(t.to(self.device) for t in aux_for(config, s)) for s in self.layers}
        self._factors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.scale = 1.0
        self._attached = False

    # -- wrapping -------------------------------------------------------------------------
    def attach(self) -> "LiDBInjector":
        if self._attached:
            return self
        for spec in self.layers:
            lin = self._linears[spec.name]
            if "forward" in vars(lin):
                raise HDBError(f"Layer {spec.name} is already wrapped by another adapter; remove it before "
                               f"applying a LiDB.")
            lin.forward = self._wrapped(spec.name, lin.forward)
        self._attached = True
        return self

    def remove(self) -> None:
        if not self._attached:
            return
        for spec in self.layers:
            vars(self._linears[spec.name]).pop("forward", None)
        self._attached = False
        self._factors = None

    def __enter__(self) -> "LiDBInjector":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.remove()

    def _wrapped(self, name: str, original):
        def forward(x, *args, **kwargs):
            y = original(x, *args, **kwargs)
            factors = self._factors
            if factors is None:
                return y
            down, up = factors[name]
            return y + self.scale * _residual(x, down, up).reshape(y.shape)
        return forward

    # -- weights --------------------------------------------------------------------------
    def set_train(self, a_train: TrainBatch, b_train: TrainBatch, scale: float = 1.0) -> None:
        """Per-sample weights: a_train[name] [N, a_l, r], b_train[name] [N, r, b_l] (differentiable)."""
        factors = {}
        for spec in self.layers:
            a_aux, b_aux = self._aux[spec.name]
            at, bt = a_train[spec.name], b_train[spec.name]
            if at.dim() == 2:
                at, bt = at.unsqueeze(0), bt.unsqueeze(0)
            down, up = down_up_from(a_aux, b_aux, at.to(self.device, torch.float32), bt.to(self.device, torch.float32))
            factors[spec.name] = (down, up)
        self._factors = factors
        self.scale = float(scale)

    def set_factors(self, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], scale: float = 1.0) -> None:
        """Ready-made LoRA factors {name: (down [r, in] or [N, r, in], up [out, r] or [N, out, r])}."""
        out = {}
        for spec in self.layers:
            down, up = factors[spec.name]
            if down.dim() == 2:
                down, up = down.unsqueeze(0), up.unsqueeze(0)
            out[spec.name] = (down.to(self.device), up.to(self.device))
        self._factors = out
        self.scale = float(scale)

    def set_lidb(self, lidbs: LiDB | Sequence[LiDB], scale: float = 1.0) -> None:
        """One LiDB for every sample, or one LiDB per sample (in batch order)."""
        lidbs = [lidbs] if isinstance(lidbs, LiDB) else list(lidbs)
        check_layers_match(lidbs[0].layers, self.layers, "This LiDB")
        if lidbs[0].config != self.config or lidbs[0].layers != self.layers:
            raise HDBError("This LiDB uses different layers or aux settings than the injector was built for; "
                           "build the injector from the LiDB's own layers and config.")
        a, b = stack_train(lidbs)
        self.set_train(a, b, scale)

    def clear(self) -> None:
        """No residual until the next set_*; the wrapped model behaves like the base model."""
        self._factors = None


def _residual(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Batched (x_i @ down_i^T) @ up_i^T for x [B, ..., in], down [N, r, in], up [N, out, r]."""
    batch = x.shape[0]
    n = down.shape[0]
    if n != 1 and n != batch:
        if batch % n:
            raise HDBError(f"A batch of {batch} samples cannot use {n} per-sample LiDBs; give one LiDB or one "
                           f"per sample.")
        reps = batch // n
        down, up = down.repeat(reps, 1, 1), up.repeat(reps, 1, 1)
    xs = x.reshape(batch, -1, x.shape[-1])
    h = torch.matmul(xs, down.transpose(-1, -2).to(x.dtype))      # [B, T, r]
    return torch.matmul(h, up.transpose(-1, -2).to(x.dtype))      # [B, T, out]
