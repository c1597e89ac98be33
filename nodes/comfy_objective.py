"""The training objective on a MODEL/CLIP/VAE that a ComfyUI graph loaded.

The twin of hdb_core.training.objective.diffusers_loss: the same draws
(`objective.draw`: photo, mirror, timestep index, noise) and the same weighting
(`objective.per_sample_mse`), reached through the connected model's own
model_sampling, so eps, v and flow models all train with their native loss:
the noisy input is noise_scaling(sigma_t, noise, x0), the prediction is the model's
denoised x0, and (denoised - x0) / c_out is the model's raw output error (eps or v).
tests/test_objective.py checks that this equals the diffusers loss on shared weights.

ComfyUI internals this file relies on (check them on a ComfyUI upgrade):
* `model.model.model_sampling`: `.sigmas` (one per training timestep), `noise_scaling`,
  `calculate_denoised` (to read c_out);
* `model.model.apply_model(x, sigma, transformer_options=..., **conds)` returning denoised x0
  (sampling-time patches live in `model.model_options["transformer_options"]`; training leaves them out);
* `model.model.extra_conds(...)` and each cond's `.process_cond(batch_size, device, area).cond`
  (what the sampler does to turn CLIP output into model kwargs);
* `model.model.latent_format.latent_channels`, `process_latent_in`; `vae.encode(pixels)`;
* `clip.tokenize`, `clip.cond_stage_model.reset_clip_options/set_clip_options/encode_token_weights`,
  `clip.layer_idx` (CLIP.encode_from_tokens without its model reload, which training must avoid).
"""
from __future__ import annotations

import torch

from hdb_core.errors import HDBError
from hdb_core.training.objective import draw, per_sample_mse, pick_latents


def encode_photo_latents(vae, base_model, pixels: torch.Tensor, mirror: bool) -> torch.Tensor:
    """[K, 2, C, h, w] latents of photos [K, H, W, 3] in 0..1 (index 1: the mirrored photo, or a repeat)."""
    if vae is None:
        raise HDBError("No VAE is connected; connect the checkpoint's VAE.")
    want = base_model.latent_format.latent_channels

    def encode(p):
        latent = vae.encode(p)
        if latent.shape[1] != want:
            raise HDBError(f"The VAE gives {latent.shape[1]}-channel latents but the model expects {want}; "
                           f"connect the VAE that belongs to this checkpoint.")
        return base_model.process_latent_in(latent)

    latents = encode(pixels)
    mirrored = encode(pixels.flip(2)) if mirror else latents
    return torch.stack([latents, mirrored], dim=1)


class TextEncoder:
    """The trigger phrase through CLIP, with whatever residuals are injected into it."""

    def __init__(self, clip, text: str):
        self.clip = clip
        self.tokens = clip.tokenize(text)

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        model = self.clip.cond_stage_model
        model.reset_clip_options()
        if self.clip.layer_idx is not None:
            model.set_clip_options({"layer": self.clip.layer_idx})
        out = model.encode_token_weights(self.tokens)
        return out[0], out[1]


def sigma_at(model_sampling, timestep: int) -> torch.Tensor:
    """sigma of a training timestep index (ComfyUI keeps one sigma per training timestep).

    A fresh tensor: the schedule may be an inference tensor, which autograd must not save.
    """
    return model_sampling.sigmas[timestep].detach().float().reshape(1).clone()


def output_error(patcher, x0: torch.Tensor, noise: torch.Tensor, timestep: int, conds: dict) -> torch.Tensor:
    """The patched model's raw output (eps, v or flow) minus its target, float32, on x0 [1, C, h, w].

    Training sees the model's weights and weight patches (LoRAs, merges) but none of the
    sampling-time tricks in its transformer_options (FreeU, ToMe, HyperTile, Deep Shrink,
    attention patches): they change how an image is sampled, not who is in it; some work
    in place, which autograd cannot pass, and ToMe merges tokens at random.
    """
    base = patcher.model
    ms = base.model_sampling
    sigma = sigma_at(ms, timestep).to(x0.device)
    xt = ms.noise_scaling(sigma, noise.to(x0), x0)
    options = {"sigmas": sigma, "cond_or_uncond": [0]}
    denoised = base.apply_model(xt, sigma, transformer_options=options, **conds)
    c_out = ms.calculate_denoised(sigma, torch.ones_like(x0), torch.zeros_like(x0))
    return (denoised.float() - x0.float()) / c_out.float()


def model_loss(patcher, x0: torch.Tensor, noise: torch.Tensor, timestep: int, conds: dict) -> torch.Tensor:
    """Per-sample loss [1] of the patched model on x0 [1, C, h, w] at one timestep."""
    error = output_error(patcher, x0, noise, timestep, conds)
    return per_sample_mse(error, torch.zeros_like(error))


def conditioning(base_model, cond: torch.Tensor, pooled, x: torch.Tensor, resolution: int, device) -> dict:
    """The model kwargs for CLIP output `cond` (as the sampler builds them)."""
    conds = base_model.extra_conds(cross_attn=cond.to(device), pooled_output=pooled, noise=x, device=device,
                                   width=resolution, height=resolution, target_width=resolution,
                                   target_height=resolution)
    return {k: v.process_cond(batch_size=x.shape[0], device=device, area=None).cond for k, v in conds.items()}


class PriorTerm:
    """The prior term (hdb_core.training.objective) on the connected model: its output for the class
    prompt, residual on, held to the bare model's output on the same noised latent.

    `held` is the class prompt through the bare CLIP; `encode` re-encodes it with the residual when
    the text encoder trains, else `fixed` holds it encoded once (as `DiffusionLoss` does the trigger).
    """

    def __init__(self, weight: float, held: tuple, encode: TextEncoder | None, fixed: tuple | None):
        self.weight, self.held, self.encode, self.fixed = weight, held, encode, fixed


class DiffusionLoss:
    """A `hdb_core.training.finetune` loss function on the connected model, one photo per step.

    Each call hands this step's factors to the injector, (re)encodes the trigger when the
    text encoder trains, draws through `objective.draw` and returns the model's native loss,
    plus the prior term when one is given (one more pass with the residual, one without).
    """

    def __init__(self, patcher, latents: torch.Tensor, injector, encode: TextEncoder | None,
                 fixed_cond: tuple | None, resolution: int, mirror: bool, device: torch.device,
                 prior: PriorTerm | None = None):
        self.patcher, self.latents, self.injector = patcher, latents, injector
        self.encode, self.fixed_cond, self.prior = encode, fixed_cond, prior
        self.resolution, self.mirror, self.device = resolution, mirror, device

    def __call__(self, step: int, factors, generator: torch.Generator) -> torch.Tensor:
        self.injector.set_factors(factors)
        ms = self.patcher.model.model_sampling
        d = draw(generator, self.latents.shape[0], self.mirror, len(ms.sigmas), self.latents.shape[2:])
        x0 = pick_latents(self.latents, d)[None]
        cond, pooled = self.encode() if self.encode is not None else self.fixed_cond
        try:
            conds = conditioning(self.patcher.model, cond, pooled, x0, self.resolution, self.device)
            loss = model_loss(self.patcher, x0, d.noise[None], d.timestep, conds).mean()
        except RuntimeError as e:
            if step == 0 and _is_shape_error(e):
                raise text_mismatch(self.patcher, cond, pooled) from e
            raise
        if self.prior is None:
            return loss
        return loss + self.prior.weight * self._prior(factors, x0, d)

    def _prior(self, factors, x0: torch.Tensor, d) -> torch.Tensor:
        prior, model = self.prior, self.patcher.model
        with torch.no_grad():
            self.injector.clear()
            held = output_error(self.patcher, x0, d.noise[None], d.timestep,
                                conditioning(model, *prior.held, x0, self.resolution, self.device))
        # set again before the pass that trains: a checkpointed backward reruns it with what is set then
        self.injector.set_factors(factors)
        cond, pooled = prior.encode() if prior.encode is not None else prior.fixed
        own = output_error(self.patcher, x0, d.noise[None], d.timestep,
                           conditioning(model, cond, pooled, x0, self.resolution, self.device))
        return per_sample_mse(own, held).mean()


def _is_shape_error(e: RuntimeError) -> bool:
    text = str(e)
    # F.linear / layer_norm / rms_norm / cat refusing a text feature of the wrong width
    return any(s in text for s in ("cannot be multiplied", "must match the size", "size of tensor",
                                   "normalized_shape", "Sizes of tensors must match"))


def text_mismatch(patcher, cond, pooled) -> HDBError:
    """The one-sentence error for a CLIP from another model (its features do not fit the model's input)."""
    have = f"{cond.shape[-1]}-wide text features" + (f" and a {pooled.shape[-1]}-wide pooled vector"
                                                      if pooled is not None else "")
    return HDBError(f"The connected CLIP gives {have}, which the connected model "
                    f"({type(patcher.model.model_config).__name__}) cannot read; connect the CLIP (text encoder) "
                    f"that belongs to this checkpoint.")
