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
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from hdb_core.errors import HDBError
from hdb_core.training.data import to_model_range
from hdb_core.lidb.targets import TE, TEXT_ENCODERS, UNET, LayerSpec, check_layers_match, discover
from hdb_core.training.injector import LowRankInjector
from hdb_core.training.objective import diffusers_loss

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
        return {UNET: self.unet, TE: self.text_encoder} if text_encoder else {UNET: self.unet}

    def layers(self, text_encoder: bool = True) -> list[LayerSpec]:
        return [spec for spec, _ in discover(self.modules(text_encoder)).values()]

    def injector(self, layers: list[LayerSpec] | tuple[LayerSpec, ...], what: str = "This LiDB") -> LowRankInjector:
        """An injector over `layers` of this model, after checking the model has every one of them."""
        found = discover(self.modules(any(s.component in TEXT_ENCODERS for s in layers)))
        check_layers_match(layers, [spec for spec, _ in found.values()], what)
        return LowRankInjector({s.name: found[s.name][1] for s in layers})

    @property
    def num_timesteps(self) -> int:
        return int(self.noise_scheduler.config.num_train_timesteps)

    def loss(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
             dtype: torch.dtype | None = None) -> torch.Tensor:
        """Per-sample denoising loss [B] of the UNet (with whatever residuals are injected)."""
        return diffusers_loss(self.unet, self.noise_scheduler, latents, noise, timesteps.to(latents.device),
                              context, dtype)

    @contextmanager
    def checkpointing(self, on: bool):
        """The UNet's gradient checkpointing (diffusers') while open when `on`; always off afterwards."""
        if on:
            self.unet.enable_gradient_checkpointing()
        try:
            yield
        finally:
            self.unet.disable_gradient_checkpointing()

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


def photo_latents(base: BaseModel, images: torch.Tensor, device, mirror: bool) -> torch.Tensor:
    """[K, 2, C, h, w] latents of photos [K, H, W, 3] in 0..1; index 1 holds the mirrored photo.

    Without mirroring index 1 repeats index 0, so `objective.draw` can index either way.
    """
    pixels = to_model_range(images)
    latents = encode_latents(base, pixels, device)
    mirrored = encode_latents(base, pixels.flip(-1), device) if mirror else latents
    return torch.stack([latents, mirrored], dim=1)
