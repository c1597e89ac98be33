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
* The prior term (a finetune's `prior_weight`): on the same noised latents, the model's
  output for a class prompt ("a face") is held to the base model's, the residual off
  (`per_sample_mse` of the two). It is DreamBooth's prior preservation distilled on the
  photo itself, with no class images to generate: the update is pushed to act through
  the trigger's tokens, not on every face (measured in docs/evidence.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

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
