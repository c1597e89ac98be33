"""The frozen image encoder of the hypernetwork, outside ComfyUI (transformers).

Inside ComfyUI the user's CLIP_VISION model encodes the photo
(`encode_image`); training scripts and the CLI use the same weights through
transformers. The hypernetwork only works if both paths hand it the same
numbers, so this module reproduces ComfyUI's `clip_preprocess` step by step
(drop alpha, bicubic antialiased resize of the short side, center crop, round
to 8-bit levels, CLIP mean/std) and takes the same tokens: the penultimate
hidden states, all tokens including the class token ([B, 257, 1280] for
CLIP-ViT-H-14, what ComfyUI calls `penultimate_hidden_states` and
transformers `hidden_states[-2]`).

`EncoderSpec` is the contract between a hypernetwork file and an encoder: it is
stored in the file and compared with the connected encoder before use.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch

from hdb_core.errors import HDBError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HIDDEN_STATES = ("penultimate",)


@dataclass(frozen=True)
class EncoderSpec:
    """What features a hypernetwork expects: which encoder shape, which tokens, which preprocessing."""

    hidden_size: int = 1280
    num_tokens: int = 257
    image_size: int = 224
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    hidden_state: str = "penultimate"
    crop: bool = True
    name: str = "CLIP-ViT-H-14"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image_mean"], d["image_std"] = list(self.image_mean), list(self.image_std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "EncoderSpec":
        return cls(hidden_size=int(d["hidden_size"]), num_tokens=int(d["num_tokens"]),
                   image_size=int(d["image_size"]), image_mean=tuple(float(x) for x in d["image_mean"]),
                   image_std=tuple(float(x) for x in d["image_std"]), hidden_state=str(d["hidden_state"]),
                   crop=bool(d["crop"]), name=str(d.get("name", "")))

    def summary(self) -> str:
        return f"hidden size {self.hidden_size}, {self.num_tokens} tokens at {self.image_size} px"

    def mismatch(self, connected: "EncoderSpec") -> str | None:
        """Why `connected` cannot feed a network that expects self, or None when it can."""
        if connected.hidden_size != self.hidden_size or connected.num_tokens != self.num_tokens \
                or connected.image_size != self.image_size:
            return f"gives {connected.summary()}"
        if not _close(connected.image_mean, self.image_mean) or not _close(connected.image_std, self.image_std):
            return "normalises images with a different mean/std"
        if connected.hidden_state != self.hidden_state:
            return f"provides the {connected.hidden_state} hidden state instead of the {self.hidden_state} one"
        return None

    def check(self, connected: "EncoderSpec", what: str = "connected CLIP vision model") -> None:
        why = self.mismatch(connected)
        if why:
            raise HDBError(f"This hypernetwork expects image features from {self.name or 'its encoder'} "
                           f"({self.summary()}), but the {what} {why}: load {self.name or 'that encoder'} "
                           f"(in ComfyUI with Load CLIP Vision), the one the hypernetwork was trained with.")


def _close(a, b, tol: float = 1e-6) -> bool:
    return len(a) == len(b) and all(abs(float(x) - float(y)) <= tol for x, y in zip(a, b))


VIT_H_14 = EncoderSpec()


def check_images(images: torch.Tensor) -> None:
    """IMAGE batches are [N, H, W, C] floats in 0..1 with 3 or 4 channels and at least one image."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[-1] not in (3, 4):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise HDBError(f"Expected an image batch [N, H, W, 3] but got {shape}; connect a Load Image node "
                       f"(or another IMAGE output) to image.")
    if images.shape[0] == 0 or images.shape[1] == 0 or images.shape[2] == 0:
        raise HDBError("The image batch is empty; connect at least one photo of the face to image.")


def preprocess(images: torch.Tensor, spec: EncoderSpec) -> torch.Tensor:
    """[N, H, W, C] in 0..1 -> normalised pixels [N, 3, S, S], exactly as ComfyUI's clip_preprocess."""
    check_images(images)
    size = spec.image_size
    x = images[..., :3].movedim(-1, 1)
    if x.shape[2] != size or x.shape[3] != size:
        if spec.crop:
            scale = size / min(x.shape[2], x.shape[3])
            target = (round(scale * x.shape[2]), round(scale * x.shape[3]))
        else:
            target = (size, size)
        x = torch.nn.functional.interpolate(x, size=target, mode="bicubic", antialias=True)
        top, left = (x.shape[2] - size) // 2, (x.shape[3] - size) // 2
        x = x[:, :, top:top + size, left:left + size]
    x = torch.clip(255.0 * x, 0, 255).round() / 255.0  # the 8-bit quantisation ComfyUI applies too
    mean = torch.tensor(spec.image_mean, device=x.device, dtype=x.dtype).view(3, 1, 1)
    std = torch.tensor(spec.image_std, device=x.device, dtype=x.dtype).view(3, 1, 1)
    return (x - mean) / std


def spec_from_hf_config(config, name: str = "") -> EncoderSpec:
    """EncoderSpec of a transformers CLIPVisionConfig (penultimate tokens, CLIP normalisation)."""
    vision = getattr(config, "vision_config", config)
    tokens = (vision.image_size // vision.patch_size) ** 2 + 1
    # The folder's name, not its path: the name is shown to ComfyUI users on other machines.
    path = getattr(config, "_name_or_path", "") or ""
    source = name or (os.path.basename(os.path.normpath(path)) if path else "")
    return EncoderSpec(hidden_size=vision.hidden_size, num_tokens=tokens, image_size=vision.image_size,
                       name=source or "CLIP vision")


class ClipImageEncoder:
    """A frozen transformers CLIP vision model that returns the hypernetwork's input features."""

    def __init__(self, model, spec: EncoderSpec | None = None):
        self.model = model.eval().requires_grad_(False)
        self.spec = spec or spec_from_hf_config(model.config)

    @classmethod
    def from_pretrained(cls, path: str, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> "ClipImageEncoder":
        """A local folder or file holding a CLIPVisionModel(WithProjection) in transformers layout."""
        import transformers
        from packaging.version import Version
        from transformers import CLIPVisionModel

        # transformers 4.56 renamed the keyword and warns on the old one; the pack supports both sides
        dtype_keyword = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
        try:
            model = CLIPVisionModel.from_pretrained(path, local_files_only=True, **{dtype_keyword: dtype})
        except (OSError, ValueError) as e:
            raise HDBError(f"Could not load a CLIP vision model from '{path}' ({e}); give a local folder with "
                           f"config.json and model.safetensors, such as "
                           f"laion/CLIP-ViT-H-14-laion2B-s32B-b79K.") from None
        return cls(model.to(device))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """[N, H, W, C] images in 0..1 -> float32 features [N, tokens, hidden]."""
        pixels = preprocess(images.to(self.device, torch.float32), self.spec)
        dtype = next(self.model.parameters()).dtype
        out = self.model(pixel_values=pixels.to(dtype), output_hidden_states=True)
        return out.hidden_states[-2].float()
