"""Devices, precision, model loading, progress and Cancel, as ComfyUI provides them.

ComfyUI internals this file relies on (check them on a ComfyUI upgrade):
* `comfy.model_management.load_models_gpu(models, memory_required=, force_full_load=)`,
  `soft_empty_cache()`, `throw_exception_if_processing_interrupted()`;
* `patcher.model.memory_required(shape)`, `.manual_cast_dtype`, `.get_dtype()`;
* `comfy.utils.ProgressBar(total).update_absolute(done, total)` (the UI bar; its hook polls Cancel);
* `server.PromptServer.instance.send_progress_text` and
  `comfy_execution.utils.get_executing_context()` (text under the running node).
"""
from __future__ import annotations

import logging

import torch

import comfy.model_management
import comfy.utils

log = logging.getLogger("HyperDreamBooth")


def training_precision(device: torch.device, model_dtype: torch.dtype) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, loss scaling) for training on `device` with weights of `model_dtype`.

    CPU: full precision (exact and reproducible). CUDA: the model's own half type if it
    has one (no per-step weight casts), else bf16 where supported, else fp16; fp16 always
    with dynamic loss scaling.
    """
    if device.type != "cuda":
        return None, False
    if model_dtype == torch.bfloat16:
        return torch.bfloat16, False
    if model_dtype == torch.float16:
        return torch.float16, True
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, False
    return torch.float16, True


def model_dtype(patcher) -> torch.dtype:
    base = patcher.model
    return base.manual_cast_dtype or base.get_dtype()


def load_for_training(patcher, clip_patcher, latent_shape, checkpointing: bool) -> None:
    """Load UNet (and CLIP) fully on the compute device, reserving room for training activations."""
    # Backward keeps the forward's activations: ~3x the inference estimate, less with checkpointing.
    factor = 1.5 if checkpointing else 3.0
    need = patcher.model.memory_required(list(latent_shape)) * factor
    models = [patcher] + ([clip_patcher] if clip_patcher is not None else [])
    # Loaded as ComfyUI loads for sampling (under inference mode): weights it re-creates while loading
    # (fp8 mixed-precision QuantizedTensors, merged weight patches) stay the kind the rest of ComfyUI expects.
    with torch.inference_mode():
        comfy.model_management.load_models_gpu(models, memory_required=need, force_full_load=True)


def free_cache() -> None:
    comfy.model_management.soft_empty_cache()


def report_text(text: str) -> None:
    """Show `text` under the running node in the UI (no-op when there is no server, as in tests)."""
    try:
        import server
        from comfy_execution.utils import get_executing_context

        context = get_executing_context()
        instance = getattr(server.PromptServer, "instance", None)
        if context is not None and instance is not None:
            instance.send_progress_text(text, context.node_id)
    except Exception:  # progress text is cosmetic; never fail training over it
        log.debug("HyperDreamBooth: could not send progress text", exc_info=True)


def progress_bar():
    """A progress(done, total) callback on ComfyUI's bar, made on first use (which also polls Cancel)."""
    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = comfy.utils.ProgressBar(total)
        bar.update_absolute(done, total)
    return progress


def check_interrupt() -> None:
    comfy.model_management.throw_exception_if_processing_interrupted()
