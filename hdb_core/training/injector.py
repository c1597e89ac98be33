"""The one way a low-rank residual gets into a model while training: forward hooks.

Each target Linear keeps its weights and its place in the model (kohya's way, and the
road ComfyUI keeps supported); a forward hook adds

    y[..., rows] += (x @ down^T) @ up^T

where `rows` is the whole output or, for fused projections (q, k and v in one Linear),
the row slice that belongs to one layer. No full-size dW is ever built, so a step costs
about one forward + backward of the model. Factors are set per step:

* shared: down [r, in], up [out, r], the same residual for every sample;
* per sample: down [N, r, in], up [N, out, r]; sample i of the batch uses row i (a batch
  of k*N samples, such as classifier-free guidance's [uncond; cond], uses row i mod N).
  Stage 0 trains N identities in one forward this way.

Used by the diffusers training path (stage 0, stage 1, `hdb finetune`) and by the
ComfyUI finetune node alike; it knows nothing about LiDBs, only factors.
"""
from __future__ import annotations

from typing import Mapping, Union

import torch

from hdb_core.errors import HDBError

Rows = Union[tuple[int, int], None]          # (offset, length) of a fused projection's output, or all of it
Target = Union[torch.nn.Module, tuple[torch.nn.Module, Rows]]
Factors = Mapping[str, tuple[torch.Tensor, torch.Tensor]]

_MARK = "_hdb_low_rank_injector"             # set on a hooked module: catches a second injector


class LowRankInjector:
    """Forward hooks that add per-layer low-rank residuals; a context manager that always cleans up."""

    def __init__(self, targets: Mapping[str, Target]):
        self._by_module: dict[int, tuple[torch.nn.Module, list[tuple[str, Rows]]]] = {}
        for name, target in targets.items():
            module, rows = target if isinstance(target, tuple) else (target, None)
            self._by_module.setdefault(id(module), (module, []))[1].append((name, rows))
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles: list = []

    # -- attaching ---------------------------------------------------------------------------
    def attach(self) -> "LowRankInjector":
        if self._handles:
            return self
        try:
            for module, layers in self._by_module.values():
                if getattr(module, _MARK, None) is not None:
                    raise HDBError(f"Layer {layers[0][0]} already carries a HyperDreamBooth residual from another "
                                   f"run that is still active; finish or cancel that run first.")
                setattr(module, _MARK, self)
                self._handles.append((module, module.register_forward_hook(self._hook(layers))))
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        for module, handle in self._handles:
            handle.remove()
            if getattr(module, _MARK, None) is self:
                delattr(module, _MARK)
        self._handles.clear()
        self.factors = {}

    def __enter__(self) -> "LowRankInjector":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.remove()

    # -- factors -------------------------------------------------------------------------------
    def set_factors(self, factors: Factors) -> None:
        """This step's factors by layer name; a layer without factors passes through unchanged."""
        self.factors = dict(factors)

    def clear(self) -> None:
        """No residual until the next `set_factors`: the model behaves like the base model."""
        self.factors = {}

    def _hook(self, layers: list[tuple[str, Rows]]):
        # A fused projection's slices (q, k, v of one Linear) go in with one concatenation per forward:
        # the fused output (Flux's linear1 is 7x the width) is copied once, not once per slice.
        whole = [name for name, rows in layers if rows is None]
        sliced = sorted(((rows, name) for name, rows in layers if rows is not None), key=lambda t: t[0][0])
        if any(a[0] + a[1] > b[0] for (a, _), (b, _) in zip(sliced, sliced[1:])):
            raise ValueError(f"overlapping row slices on one module: {[n for _, n in sliced]}")

        def hook(module, args, output):
            x = args[0]
            pieces, end = [], 0
            for (offset, length), name in sliced:
                f = self.factors.get(name)
                if f is None:
                    continue
                if offset > end:
                    pieces.append(output[..., end:offset])
                pieces.append(output[..., offset:offset + length] + residual(x, *f).to(output.dtype))
                end = offset + length
            if pieces:
                if end < output.shape[-1]:
                    pieces.append(output[..., end:])
                output = torch.cat(pieces, dim=-1)
            for name in whole:
                f = self.factors.get(name)
                if f is not None:
                    output = output + residual(x, *f).to(output.dtype)
            return output
        return hook


def residual(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """(x @ down^T) @ up^T with shared ([r, in], [out, r]) or per-sample ([N, r, in], [N, out, r]) factors."""
    down, up = down.to(device=x.device, dtype=x.dtype), up.to(device=x.device, dtype=x.dtype)
    if down.dim() == 2:
        return torch.nn.functional.linear(torch.nn.functional.linear(x, down), up)
    batch, n = x.shape[0], down.shape[0]
    if n == 1:
        down, up = down[0], up[0]
        return torch.nn.functional.linear(torch.nn.functional.linear(x, down), up)
    if batch % n:
        raise HDBError(f"A batch of {batch} samples cannot use {n} per-sample LiDBs; give one LiDB or one per sample.")
    if batch != n:
        down, up = down.repeat(batch // n, 1, 1), up.repeat(batch // n, 1, 1)
    xs = x.reshape(batch, -1, x.shape[-1])
    out = torch.matmul(torch.matmul(xs, down.transpose(-1, -2)), up.transpose(-1, -2))
    return out.reshape(*x.shape[:-1], up.shape[-2])
