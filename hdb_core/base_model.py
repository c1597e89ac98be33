"""Load a Stable Diffusion base model for training, offline.

Two layouts are accepted: a diffusers folder (model_index.json, unet/, vae/,
text_encoder/, tokenizer/, scheduler/) or a single-file checkpoint
(.safetensors) together with a diffusers folder that provides its configs
(`config_dir`; the configs and tokenizer files are enough). Nothing is ever
downloaded (`local_files_only=True` everywhere): what is missing is named in
the error instead.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .diffusers_lidb import model_layers
from .errors import HDBError
from .targets import LayerSpec

REQUIRED = {
    "unet": ("config.json",),
    "vae": ("config.json",),
    "text_encoder": ("config.json",),
    "scheduler": ("scheduler_config.json",),
}
TOKENIZER_FILES = (("vocab.json", "merges.txt"), ("tokenizer.json",))
WEIGHT_FILES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}


@dataclass
class BaseModel:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    noise_scheduler: object   # DDPMScheduler built from the model's scheduler config (training)
    name: str

    def modules(self, text_encoder: bool = True) -> dict[str, torch.nn.Module]:
        return {"unet": self.unet, "te": self.text_encoder} if text_encoder else {"unet": self.unet}

    def layers(self, text_encoder: bool = True) -> list[LayerSpec]:
        return model_layers(self.modules(text_encoder))

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def vae_scale(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", 0.18215))

    def to(self, device, dtype: torch.dtype = torch.float32) -> "BaseModel":
        """Frozen weights on `device`; the VAE stays float32 (SD1.x's VAE overflows in fp16)."""
        for m in (self.unet, self.text_encoder, self.vae):
            target = dtype if m is not self.vae else torch.float32
            # diffusers warns on any dtype cast, so cast only when the dtype changes.
            m.to(device) if m.dtype == target else m.to(device, target)
            m.eval().requires_grad_(False)
        return self


def check_diffusers_folder(path: str) -> None:
    """HDBError naming the first missing config/tokenizer file of a diffusers folder."""
    for sub, files in REQUIRED.items():
        for f in files:
            if not os.path.isfile(os.path.join(path, sub, f)):
                raise HDBError(f"The diffusers folder '{path}' has no {sub}/{f}; copy the complete model folder "
                               f"(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/) - "
                               f"nothing is downloaded at run time.")
    tok = os.path.join(path, "tokenizer")
    if not any(all(os.path.isfile(os.path.join(tok, f)) for f in group) for group in TOKENIZER_FILES):
        raise HDBError(f"The diffusers folder '{path}' has no tokenizer/vocab.json and tokenizer/merges.txt; copy "
                       f"the complete model folder - nothing is downloaded at run time.")


def _check_weights(path: str) -> None:
    for sub, stem in WEIGHT_FILES.items():
        folder = os.path.join(path, sub)
        names = os.listdir(folder)
        if not any(n.startswith(stem) and n.endswith((".safetensors", ".bin")) for n in names):
            raise HDBError(f"The diffusers folder '{path}' has no weights in {sub}/ (expected {stem}.safetensors); "
                           f"copy the complete model folder - nothing is downloaded at run time.")


def load_base_model(path: str, config_dir: str | None = None) -> BaseModel:
    """The frozen parts of an SD1.x/2.x model on the CPU in float32 (move with `.to`)."""
    if not path or not os.path.exists(path):
        raise HDBError(f"Base model '{path}' does not exist; give a local diffusers folder (with model_index.json) "
                       f"or a single-file .safetensors checkpoint - nothing is downloaded.")
    if os.path.isdir(path):
        check_diffusers_folder(path)
        _check_weights(path)
        return _load_parts(path, os.path.basename(os.path.normpath(path)))
    return _load_single_file(path, config_dir)


def _load_parts(path: str, name: str) -> BaseModel:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    kw = dict(local_files_only=True)
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **kw)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw)
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw)
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **kw)
    except (OSError, ValueError, EnvironmentError) as e:
        raise HDBError(f"The diffusers folder '{path}' could not be loaded ({str(e).splitlines()[0]}); check that "
                       f"it is a complete Stable Diffusion 1.x/2.x folder.") from None
    return BaseModel(unet, vae, text_encoder, tokenizer, scheduler, name)


def _load_single_file(path: str, config_dir: str | None) -> BaseModel:
    if not path.endswith(".safetensors"):
        raise HDBError(f"'{os.path.basename(path)}' is not a .safetensors checkpoint; convert it to .safetensors "
                       f"(pickled .ckpt files are not loaded) or give a diffusers folder.")
    if not config_dir:
        raise HDBError("A single-file checkpoint needs its model configs offline: pass --base-config with a local "
                       "diffusers folder of the same architecture (configs and tokenizer files are enough).")
    if not os.path.isdir(config_dir):
        raise HDBError(f"Config folder '{config_dir}' does not exist; give a local diffusers folder of the same "
                       f"architecture as '{os.path.basename(path)}'.")
    check_diffusers_folder(config_dir)
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    try:
        pipe = StableDiffusionPipeline.from_single_file(path, config=config_dir, local_files_only=True,
                                                        safety_checker=None, requires_safety_checker=False)
        scheduler = DDPMScheduler.from_pretrained(config_dir, subfolder="scheduler", local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise HDBError(f"'{os.path.basename(path)}' could not be loaded with the configs of '{config_dir}' "
                       f"({str(e).splitlines()[0]}); check that both are the same SD version.") from None
    return BaseModel(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, scheduler,
                     os.path.splitext(os.path.basename(path))[0])


@torch.no_grad()
def encode_latents(base: BaseModel, pixels: torch.Tensor, device) -> torch.Tensor:
    """[K, 3, H, W] in -1..1 -> scaled latents [K, 4, H/8, W/8] (the posterior mean: deterministic)."""
    dist = base.vae.encode(pixels.to(device, torch.float32)).latent_dist
    return dist.mean * base.vae_scale


def tokenize(base: BaseModel, prompts: list[str], device) -> torch.Tensor:
    length = min(int(base.tokenizer.model_max_length), int(base.text_encoder.config.max_position_embeddings))
    tok = base.tokenizer(prompts, padding="max_length", max_length=length,
                         truncation=True, return_tensors="pt")
    return tok.input_ids.to(device)


def training_target(base: BaseModel, latents, noise, timesteps):
    """What the UNet must predict for these noised latents: eps, or v for v-prediction models."""
    if base.prediction_type == "epsilon":
        return noise
    if base.prediction_type == "v_prediction":
        return base.noise_scheduler.get_velocity(latents, noise, timesteps)
    raise HDBError(f"Prediction type {base.prediction_type!r} of the base model is not supported; use an "
                   f"epsilon or v-prediction SD model.")
