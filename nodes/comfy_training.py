"""How a LiDB is trained (or scored) on the MODEL/CLIP/VAE a ComfyUI graph already loaded.

`training_session` puts the pieces together, each from its own file: the model loaded
for training (comfy_runtime), autograd through inference-mode weights (comfy_autograd),
the core's one injector on the target Linears (comfy_targets finds them), and the
objective through the model's model_sampling (comfy_objective). `finetune_on_model`
and `held_out_loss` are its two users.
"""
from __future__ import annotations

import contextlib
import logging

import torch

from hdb_core.lidb.targets import DIFFUSION_COMPONENTS
from hdb_core.lidb.weights import LiDB
from hdb_core.training.finetune import FinetuneResult, FinetuneSettings, finetune
from hdb_core.training.injector import LowRankInjector
from . import comfy_autograd as autograd
from . import comfy_objective as objective
from . import comfy_runtime as runtime
from . import comfy_targets as ct
from .photo_input import prepare_pixels

log = logging.getLogger("HyperDreamBooth")


@contextlib.contextmanager
def training_session(model, clip, layer_names, latent_shape, checkpointing: bool = False):
    """An attached injector over `layer_names` of the loaded model/CLIP, ready for backward."""
    base = model.model
    unet_t, clip_t = ct.model_targets(model), ct.clip_targets(clip)
    modules = ct.target_modules(base, {n: unet_t[n] for n in layer_names if n in unet_t})
    modules.update(ct.target_modules(clip.cond_stage_model, {n: clip_t[n] for n in layer_names if n in clip_t}))
    runtime.load_for_training(model, clip.patcher, latent_shape, checkpointing)
    try:
        # DiT blocks add their residuals in place (`x += gate * attn(norm(x))`), as ComfyUI's CLIP layers do.
        dit = None if ct.is_unet(model) else base.diffusion_model
        with autograd.trainable_through(base, clip.cond_stage_model), LowRankInjector(modules) as injector, \
                autograd.layer_norm_inputs_copied(clip.cond_stage_model), autograd.layer_norm_inputs_copied(dit), \
                autograd.gradient_checkpointing(base.diffusion_model, checkpointing):
            yield injector
    finally:
        runtime.free_cache()


def finetune_on_model(model, clip, latents: torch.Tensor, start: LiDB, prompt: str, resolution: int,
                      settings: FinetuneSettings, train_text_encoder: bool, mirror: bool, checkpointing: bool,
                      progress=None, prior_weight: float = 0.0, class_prompt: str = "", **info) -> FinetuneResult:
    """HyperDreamBooth's fast finetune of `start` on photo latents [K, 2, C, h, w] of the connected model,
    with the prior term for `class_prompt` when `prior_weight` > 0."""
    with torch.inference_mode(False):
        latents = latents.detach().clone().to(settings.device)
        names = [s.name for s in start.layers]
        te_names = [s.name for s in start.layers if s.component not in DIFFUSION_COMPONENTS]
        with training_session(model, clip, names, latents[:1, 0].shape, checkpointing) as injector:

            def encoded(text: str, residual: bool):
                """The text encoder's output once, without gradients: with the start's TE residuals if any
                (it stays frozen), or through the bare CLIP."""
                injector.set_factors({n: start.down_up(n) for n in te_names} if residual else {})
                with torch.no_grad():
                    return tuple(t.detach() if t is not None else None for t in objective.TextEncoder(clip, text)())

            encode = objective.TextEncoder(clip, prompt) if train_text_encoder else None
            fixed = None if train_text_encoder else encoded(prompt, True)
            prior = None
            if prior_weight > 0:
                prior = objective.PriorTerm(
                    prior_weight, encoded(class_prompt, False),
                    objective.TextEncoder(clip, class_prompt) if train_text_encoder else None,
                    None if train_text_encoder else encoded(class_prompt, True))
            loss = objective.DiffusionLoss(model, latents, injector, encode, fixed, resolution, mirror,
                                           settings.device, prior)
            return finetune(start, loss, settings, progress=progress, check_cancel=runtime.check_interrupt, **info)


def held_out_loss(model, clip, vae, image, lidb, trigger: str, resolution: int, draws: int = 16,
                  seed: int = 12345) -> float:
    """Mean loss of `lidb` (None: the bare model) over `draws` fixed draws on the photo (no mirror).

    The same draws for every LiDB make losses comparable, unlike the noisy per-step
    training losses: a lower value means the LiDB denoises this person's photo better.
    """
    with torch.inference_mode(False), torch.no_grad():
        pixels = prepare_pixels(image, resolution)
        latents = objective.encode_photo_latents(vae, model.model, pixels, mirror=False).clone()
        names = [s.name for s in lidb.layers] if lidb is not None else []
        with training_session(model, clip, names, latents[:1, 0].shape) as injector:
            factors = {n: lidb.down_up(n) for n in names}
            injector.set_factors(factors)
            cond = objective.TextEncoder(clip, trigger)()
            loss = objective.DiffusionLoss(model, latents.to(model.load_device), injector, None, cond, resolution,
                                           False, model.load_device)
            generator = torch.Generator().manual_seed(seed)
            total = sum(float(loss(i, factors, generator)) for i in range(draws))
    return total / draws
