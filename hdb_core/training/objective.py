"""The one training objective: "noise, timestep, noisy input, model target, loss".

Every trainer in the pack optimises the same denoising loss:

* `draw` picks, from the caller's generator, which photo (and whether its mirror),
  which timestep and which noise a sample uses. Stage 0, stage 1, `hdb finetune`
  and the ComfyUI finetune node all draw through it, in the same order, so the same
  seed gives the same draws everywhere.
* `per_sample_mse` is the weighting: a plain mean over every number of a sample
  (uniform over timesteps, independent of resolution).
* `diffusers_loss` is the objective on a diffusers UNet with its DDPM scheduler: the
  model predicts eps (or v) from the noised latents, the error is against that target.
  The ComfyUI twin (nodes/comfy_objective.py) reaches the same number through the
  connected model's model_sampling; tests/test_objective.py checks they agree.
* The prior term (`prior_weight` of a finetune, of stage 0 and of stage 1; `PriorTerm`):
  on the same noised latents, the model's output for a class prompt ("a face") is held
  to the base model's, the residual off (`per_sample_mse` of the two). It is DreamBooth's
  prior preservation distilled on the photo itself, with no class images to generate:
  the update is pushed to act through the trigger's tokens, not on every face
  (measured in docs/evidence.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch

from hdb_core import defaults
from hdb_core.errors import HDBError


@dataclass(frozen=True)
class Draw:
    """The random choices of one training sample."""

    photo: int          # index into the identity's photos
    mirrored: bool      # use the photo's mirror image
    timestep: int       # 0 .. num_timesteps - 1 (index into the model's noise schedule)
    noise: torch.Tensor  # standard normal, the latent's shape (CPU, float32)


def draw(generator: torch.Generator, num_photos: int, mirror: bool, num_timesteps: int,
         latent_shape: tuple[int, ...]) -> Draw:
    """One sample's draws, always in this order: photo, mirror, timestep, noise."""
    photo = int(torch.randint(num_photos, (1,), generator=generator))
    mirrored = bool(torch.randint(2, (1,), generator=generator)) if mirror else False
    timestep = int(torch.randint(num_timesteps, (1,), generator=generator))
    noise = torch.randn(tuple(latent_shape), generator=generator)
    return Draw(photo, mirrored, timestep, noise)


def pick_latents(latents: torch.Tensor, d: Draw) -> torch.Tensor:
    """The drawn photo's latent from [K, 2, C, h, w] (index 1 along dim 1: the mirrored photo)."""
    return latents[d.photo, 1 if d.mirrored else 0]


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each sample [B], computed in float32."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(1)


def diffusers_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What a diffusers UNet must predict for these noised latents: eps, or v for v-prediction models."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise HDBError(f"Prediction type {kind!r} of the base model is not supported; use an epsilon or "
                   f"v-prediction SD model.")


def diffusers_output(unet, scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                     context: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A diffusers UNet2DConditionModel's raw output (eps or v) on the noised latents."""
    dtype = dtype or latents.dtype
    noisy = scheduler.add_noise(latents, noise, timesteps)
    return unet(noisy.to(dtype), timesteps, context.to(dtype)).sample


def diffusers_loss(unet, scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                   context: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per-sample denoising loss [B] of a diffusers UNet2DConditionModel (residuals already injected)."""
    prediction = diffusers_output(unet, scheduler, latents, noise, timesteps, context, dtype)
    return per_sample_mse(prediction, diffusers_target(scheduler, latents, noise, timesteps))


def check_prior(weight: float, class_prompt: str) -> None:
    """The prior term's inputs (every trainer alike): a weight of 0 or more, and a class prompt when on."""
    if not (weight >= 0 and math.isfinite(weight)):
        raise HDBError(f"prior_weight is {weight}; use 0 (off) or a positive weight such as 1.")
    if weight > 0 and not class_prompt.strip():
        raise HDBError(f"prior_weight is {weight:g} but class_prompt is empty; give the class prompt, such as "
                       f"'{defaults.CLASS_PROMPT}', or set prior_weight to 0.")


class PriorTerm:
    """The prior term [B] of a diffusers `BaseModel` whose residuals `injector` applies.

    `class_ids` are the class prompt's token ids, one row; `per_sample` when each sample has
    its own residuals (stage 0, stage 1: the text encoder then runs once per sample), not
    when all share them (a finetune). The bare model's class-prompt context is encoded
    once. Call it before the main loss's forward: it clears the residuals for the held
    output and leaves `factors` set, so a gradient-checkpointed backward reruns with them.
    """

    def __init__(self, base, injector, class_ids: torch.Tensor, per_sample: bool):
        self.base, self.injector, self.class_ids, self.per_sample = base, injector, class_ids, per_sample
        self._bare_context: torch.Tensor | None = None

    def __call__(self, factors, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                 dtype: torch.dtype | None = None) -> torch.Tensor:
        n = latents.shape[0]
        output = partial(diffusers_output, self.base.unet, self.base.noise_scheduler, latents, noise, timesteps,
                         dtype=dtype)
        with torch.no_grad():
            self.injector.clear()
            if self._bare_context is None:
                self._bare_context = self.base.text_encoder(self.class_ids)[0].detach()
            held = output(self._bare_context.expand(n, -1, -1))
        self.injector.set_factors(factors)
        context = self.base.text_encoder(self.class_ids.expand(n, -1) if self.per_sample else self.class_ids)[0]
        return per_sample_mse(output(context.expand(n, -1, -1)), held)
