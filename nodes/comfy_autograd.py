"""Autograd through a model that ComfyUI loaded under inference mode.

ComfyUI's executor runs every node under torch.inference_mode(), so weights loaded
there are inference tensors, which autograd refuses to save for backward. For the
duration of training every parameter (and inference-mode buffer) is swapped for a
zero-copy, gradient-free alias of the same storage: backward works, nothing is
copied, and the model's own tensors are put back afterwards (also on error/Cancel).

ComfyUI internals this file relies on (check them on a ComfyUI upgrade):
* weights are plain torch.Tensor/Parameter in `module._parameters` (quantised weights,
  which are tensor subclasses, are left alone);
* ComfyUI's CLIP layers and DiT blocks (Flux, ...) add residuals in place (`x += attn(norm(x))`)
  after a LayerNorm (an nn.LayerNorm subclass) saved x for backward;
* the UNet's `diffusion_model` children (input/middle/output blocks) are ModuleLists of
  TimestepEmbedSequential blocks that `openaimodel.forward_timestep_embed` runs layer by layer,
  calling each layer (ResBlock, SpatialTransformer, Down/Upsample) but never the block's own
  forward: gradient checkpointing recomputes those layers (DiT blocks are called whole).
"""
from __future__ import annotations

import contextlib

import torch


def _alias(t: torch.Tensor) -> torch.Tensor:
    """A normal (non-inference) tensor on the same storage, without gradient; no copy is made."""
    if not t.is_inference():
        return t.detach()
    out = torch.empty(0, dtype=t.dtype, device=t.device)
    out.set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())
    return out


@contextlib.contextmanager
def trainable_through(*modules: torch.nn.Module):
    """Let autograd pass through `modules` (gradients reach the inputs, never their weights)."""
    swapped: list[tuple[dict, str, object]] = []
    aliases: dict[int, torch.Tensor] = {}
    try:
        with torch.inference_mode(False):
            for module in modules:
                for m in module.modules():
                    for store in (m._parameters, m._buffers):
                        for name, t in list(store.items()):
                            if t is None or (store is m._buffers and not t.is_inference()):
                                continue
                            if type(t) not in (torch.Tensor, torch.nn.Parameter):
                                continue  # quantised/subclass weights: leave as they are
                            new = aliases.get(id(t))
                            if new is None:
                                new = _alias(t)
                                if store is m._parameters:
                                    new = torch.nn.Parameter(new, requires_grad=False)
                                aliases[id(t)] = new
                            swapped.append((store, name, t))
                            store[name] = new
        yield
    finally:
        for store, name, original in reversed(swapped):
            store[name] = original


@contextlib.contextmanager
def layer_norm_inputs_copied(module: torch.nn.Module | None):
    """Make in-place residual adds safe for autograd inside `module` (ComfyUI's CLIP layers and DiT blocks;
    None: nothing to do).

    The norm keeps its input for backward and the in-place add then changes it; feeding
    every LayerNorm a copy of its input (one [tokens, width] tensor per norm) keeps it intact.
    """
    def copy_input(_module, args):
        if torch.is_grad_enabled() and args and isinstance(args[0], torch.Tensor):
            return (args[0].clone(),) + tuple(args[1:])
        return None

    handles = []
    try:
        for m in module.modules() if module is not None else ():
            if isinstance(m, torch.nn.LayerNorm):
                handles.append(m.register_forward_pre_hook(copy_input))
        yield
    finally:
        for h in handles:
            h.remove()


def _on_copies(forward):
    """`forward` on copies of its float tensor inputs: a DiT block adds into its own input in place, and
    the checkpoint keeps those inputs to recompute the block in backward."""
    def own(v):
        return v.clone() if isinstance(v, torch.Tensor) and v.is_floating_point() else v

    def run(*args, **kwargs):
        return forward(*(own(a) for a in args), **{k: own(v) for k, v in kwargs.items()})
    return run


@contextlib.contextmanager
def gradient_checkpointing(diffusion_model: torch.nn.Module, enabled: bool):
    """Recompute each top-level block in backward instead of storing its activations: DiT double/single
    blocks, and each layer of the UNet's input/middle/output blocks (the UNet calls those, not the blocks)."""
    if not enabled:
        yield
        return
    blocks = []
    for child in diffusion_model.children():
        for block in child if isinstance(child, torch.nn.ModuleList) else [child]:
            # the UNet runs a TimestepEmbedSequential layer by layer (forward_timestep_embed), never through
            # its forward: its layers are what gets called
            blocks.extend(block if isinstance(block, torch.nn.Sequential) else [block])
    saved = []
    try:
        for block in blocks:
            had = "forward" in block.__dict__
            original = block.forward

            def checkpointed(*args, _f=original, **kwargs):
                return torch.utils.checkpoint.checkpoint(_on_copies(_f), *args, use_reentrant=False, **kwargs)

            saved.append((block, had, block.__dict__.get("forward")))
            block.forward = checkpointed
        yield
    finally:
        for block, had, previous in saved:
            if had:
                block.forward = previous
            else:
                del block.forward
