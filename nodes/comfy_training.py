"""How a LiDB is trained on the MODEL/CLIP/VAE a ComfyUI graph already loaded.

Three ComfyUI-specific problems, each solved here and nowhere else:

* Residuals in the model without touching it. Like kohya's LoRA module, each
  target Linear gets an extra low-rank path on its activations through a
  forward hook: y = W x + up (down x). No weight is copied or changed and no
  full-size dW is built, so a step costs about one UNet forward + backward.
* The executor's inference mode. Weights loaded inside it are inference tensors,
  which autograd refuses to save for backward. For the duration of training
  every parameter (and inference-mode buffer) is swapped for a zero-copy,
  gradient-free alias of the same storage: backward works, nothing is copied,
  and the model's own parameters are put back afterwards (also on error/Cancel).
* The objective. The loss goes through the connected model's model_sampling:
  the sample is noise_scaling(sigma, noise, x0), the prediction is the model's
  denoised x0, and the error is divided by the model's output scale c_out
  (denoised = c_skip x + c_out F), which turns it into the model's own native
  loss: eps-MSE for eps models, v-MSE for v models, flow-MSE for flow models.
"""
from __future__ import annotations

import contextlib
import logging

import torch

import comfy.model_management
import comfy.utils

from ..hdb_core.errors import HDBError
from . import comfy_targets as ct

log = logging.getLogger("HyperDreamBooth")

MIN_IMAGE_SIDE = 64
_PERCENT_EDGE = 1e-3  # percent_to_sigma is infinite/zero at the ends of [0, 1]


# -- autograd through inference-mode weights ---------------------------------------------

def _alias(t: torch.Tensor) -> torch.Tensor:
    """A normal (non-inference) tensor on the same storage, without gradient; no copy is made."""
    if not t.is_inference():
        return t.detach()
    out = torch.empty(0, dtype=t.dtype, device=t.device)
    out.set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())
    return out


@contextlib.contextmanager
def trainable_through(*modules: torch.nn.Module):
    """Let autograd pass through `modules` (gradients reach the inputs, never their weights).

    Parameters become gradient-free aliases of their own storage and inference-mode
    buffers get aliases too; everything is restored when the block ends, however it ends.
    """
    swapped: list[tuple[dict, str, object]] = []
    aliases: dict[int, torch.Tensor] = {}
    try:
        with torch.inference_mode(False):
            _swap(modules, swapped, aliases)
        yield
    finally:
        for store, name, original in reversed(swapped):
            store[name] = original


def _swap(modules, swapped: list, aliases: dict) -> None:
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


@contextlib.contextmanager
def layer_norm_inputs_copied(module: torch.nn.Module):
    """Make in-place residual adds safe for autograd inside `module` (ComfyUI's CLIP layers).

    ComfyUI's CLIP does `x += attn(layer_norm1(x))`: fine for inference, but the norm
    keeps x for backward and the add then changes it. Feeding every LayerNorm a copy of
    its input (tiny: one [tokens, width] tensor per norm) keeps the saved value intact.
    """
    def copy_input(_module, args):
        if torch.is_grad_enabled() and args and isinstance(args[0], torch.Tensor):
            return (args[0].clone(),) + tuple(args[1:])
        return None

    handles = []
    try:
        for m in module.modules():
            if isinstance(m, torch.nn.LayerNorm):
                handles.append(m.register_forward_pre_hook(copy_input))
        yield
    finally:
        for h in handles:
            h.remove()


# -- the low-rank path on target layers -----------------------------------------------------

class LowRankPaths:
    """Forward hooks that add up @ (down @ x) to the outputs of the target Linears.

    `factors` (canonical name -> (down, up)) is set by the training loop every step;
    a layer without factors passes through unchanged. Use as a context manager:
    the hooks are removed on exit whatever happens.
    """

    def __init__(self, layers: dict[str, torch.nn.Module]):
        self.layers = layers
        self.factors: dict = {}
        self._handles: list = []

    def _hook(self, name: str):
        def hook(module, args, output):
            f = self.factors.get(name)
            if f is None:
                return output
            down, up = f
            x = args[0]
            low = torch.nn.functional.linear(x, down.to(device=x.device, dtype=x.dtype))
            return output + torch.nn.functional.linear(low, up.to(device=x.device, dtype=x.dtype)).to(output.dtype)
        return hook

    def __enter__(self) -> "LowRankPaths":
        try:
            for name, module in self.layers.items():
                self._handles.append(module.register_forward_hook(self._hook(name)))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.factors = {}


def target_modules(root: torch.nn.Module, targets: dict[str, ct.Target], strip: str = "") -> dict[str, torch.nn.Module]:
    """Canonical name -> the Linear module, from ModelPatcher keys like 'diffusion_model.x.to_q.weight'."""
    out = {}
    for name, t in targets.items():
        path = t.key[: -len(".weight")]
        if strip and path.startswith(strip):
            path = path[len(strip):]
        out[name] = root.get_submodule(path)
    return out


# -- gradient checkpointing -------------------------------------------------------------------

@contextlib.contextmanager
def gradient_checkpointing(diffusion_model: torch.nn.Module, enabled: bool):
    """Recompute each top-level UNet block in backward instead of storing its activations."""
    if not enabled:
        yield
        return
    blocks = []
    for child in diffusion_model.children():
        blocks.extend(child if isinstance(child, torch.nn.ModuleList) else [child])
    saved = []
    try:
        for block in blocks:
            had = "forward" in block.__dict__
            original = block.forward

            def checkpointed(*args, _f=original, **kwargs):
                return torch.utils.checkpoint.checkpoint(_f, *args, use_reentrant=False, **kwargs)

            saved.append((block, had, block.__dict__.get("forward")))
            block.forward = checkpointed
        yield
    finally:
        for block, had, previous in saved:
            if had:
                block.forward = previous
            else:
                del block.forward


# -- inputs -------------------------------------------------------------------------------------

def prepare_pixels(image: torch.Tensor, resolution: int) -> torch.Tensor:
    """[B, res, res, 3] in 0..1: RGB(A)/grayscale photos resized (shorter side) and centre-cropped."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise HDBError(f"image has shape {shape}, not an IMAGE batch [B, H, W, C]; connect a Load Image node.")
    b, h, w, c = image.shape
    if b == 0:
        raise HDBError("The image batch is empty; connect at least one photo of the person.")
    if min(h, w) < MIN_IMAGE_SIDE:
        raise HDBError(f"The photo is only {w}x{h} pixels; use one at least {MIN_IMAGE_SIDE} px on each side "
                       f"(ideally {resolution} px or more).")
    if c in (1, 2):          # grayscale, grayscale + alpha
        image = image[..., :1].expand(b, h, w, 3)
    elif c == 4:             # RGBA: the alpha channel is ignored (ComfyUI's Load Image gives it as a MASK)
        image = image[..., :3]
    elif c != 3:
        raise HDBError(f"The image has {c} channels; connect an RGB, RGBA or grayscale photo.")
    if not torch.isfinite(image).all():
        raise HDBError("The image contains NaN or infinite values; connect a decoded photo (values 0..1).")
    if min(h, w) < resolution:
        log.warning("HyperDreamBooth: the photo (%dx%d) is smaller than resolution %d and is upscaled; "
                    "a larger photo gives a sharper identity.", w, h, resolution)
    pixels = image.float().clamp(0, 1).movedim(-1, 1)
    pixels = comfy.utils.common_upscale(pixels, resolution, resolution, "bicubic", "center")
    return pixels.clamp(0, 1).movedim(1, -1).contiguous()


def encode_latents(vae, base_model, pixels: torch.Tensor) -> torch.Tensor:
    """The photos as the model's (scaled) latents: VAE encode, then the model's process_latent_in."""
    if vae is None:
        raise HDBError("No VAE is connected; connect the checkpoint's VAE.")
    latent = vae.encode(pixels)
    want = base_model.latent_format.latent_channels
    if latent.shape[1] != want:
        raise HDBError(f"The VAE gives {latent.shape[1]}-channel latents but the model expects {want}; "
                       f"connect the VAE that belongs to this checkpoint.")
    return base_model.process_latent_in(latent)


class TextEncoder:
    """The trigger phrase through CLIP, with the LiDB's text-encoder residuals active."""

    def __init__(self, clip, text: str):
        self.clip = clip
        self.tokens = clip.tokenize(text)

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        # As CLIP.encode_from_tokens, but without reloading models mid-training.
        model = self.clip.cond_stage_model
        model.reset_clip_options()
        if self.clip.layer_idx is not None:
            model.set_clip_options({"layer": self.clip.layer_idx})
        out = model.encode_token_weights(self.tokens)
        return out[0], out[1]


# -- the loss -------------------------------------------------------------------------------------

class DiffusionLoss:
    """The connected model's own denoising loss on the photo latents, one photo per step.

    Called by hdb_core.finetune with this step's LiDB factors; it hands them to the
    hooks, (re)encodes the trigger when the text encoder trains, draws noise and a
    timestep from the run's generator and returns the native-parameterisation MSE.
    """

    def __init__(self, patcher, latents: torch.Tensor, paths: LowRankPaths, encode: TextEncoder | None,
                 fixed_cond: tuple | None, resolution: int, device: torch.device):
        self.patcher = patcher
        self.base = patcher.model
        self.latents = latents
        self.paths = paths
        self.encode = encode
        self.fixed_cond = fixed_cond
        self.resolution = resolution
        self.device = device

    def _conditioning(self, x: torch.Tensor) -> dict:
        cond, pooled = self.encode() if self.encode is not None else self.fixed_cond
        conds = self.base.extra_conds(cross_attn=cond.to(self.device), pooled_output=pooled, noise=x,
                                      device=self.device, width=self.resolution, height=self.resolution,
                                      target_width=self.resolution, target_height=self.resolution)
        return {k: v.process_cond(batch_size=x.shape[0], device=self.device, area=None).cond
                for k, v in conds.items()}

    def __call__(self, step: int, factors, generator: torch.Generator) -> torch.Tensor:
        self.paths.factors = factors
        ms = self.base.model_sampling
        x0 = self.latents[step % self.latents.shape[0]].unsqueeze(0)
        noise = torch.randn(x0.shape, generator=generator).to(x0)
        percent = _PERCENT_EDGE + (1 - 2 * _PERCENT_EDGE) * torch.rand((), generator=generator).item()
        sigma = torch.tensor([ms.percent_to_sigma(percent)], dtype=torch.float32, device=x0.device)
        xt = ms.noise_scaling(sigma, noise, x0)
        options = dict(self.patcher.model_options.get("transformer_options", {}))
        options.update(sigmas=sigma, cond_or_uncond=[0])
        denoised = self.base.apply_model(xt, sigma, transformer_options=options, **self._conditioning(xt))
        c_out = ms.calculate_denoised(sigma, torch.ones_like(x0), torch.zeros_like(x0))
        return (((denoised.float() - x0.float()) / c_out.float()) ** 2).mean()


# -- precision and memory ---------------------------------------------------------------------

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
    comfy.model_management.load_models_gpu(models, memory_required=need, force_full_load=True)


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


def check_interrupt() -> None:
    comfy.model_management.throw_exception_if_processing_interrupted()



def held_out_loss(model, clip, vae, image, lidb, trigger: str, resolution: int, draws: int = 16,
                  seed: int = 12345) -> float:
    """Mean diffusion loss of `lidb` (None: the bare model) over `draws` fixed noise/timestep pairs.

    The same draws for every LiDB make losses comparable, unlike the noisy per-step
    training losses: a lower value means the LiDB denoises this person's photo better.
    """
    base = model.model
    unet_t, clip_t = ct.unet_targets(model), ct.clip_targets(clip)
    with torch.inference_mode(False), torch.no_grad():
        latents = encode_latents(vae, base, prepare_pixels(image, resolution)).clone()
        layers = target_modules(base, unet_t)
        layers.update(target_modules(clip.cond_stage_model, clip_t))
        comfy.model_management.load_models_gpu([model, clip.patcher], force_full_load=True)
        with trainable_through(base, clip.cond_stage_model), LowRankPaths(layers) as paths:
            factors = {} if lidb is None else {n: lidb.down_up(n) for n in (s.name for s in lidb.layers)}
            paths.factors = factors
            cond = TextEncoder(clip, trigger)()
            loss = DiffusionLoss(model, latents.to(model.load_device), paths, None, cond, resolution,
                                 model.load_device)
            generator = torch.Generator().manual_seed(seed)
            total = sum(float(loss(i, factors, generator)) for i in range(draws))
    return total / draws
