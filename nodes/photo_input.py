"""IMAGE inputs turned into training photos, with one clear sentence for every bad input."""
from __future__ import annotations

import logging

import torch

from hdb_core.errors import HDBError
from hdb_core.face_detect import center_square

log = logging.getLogger("HyperDreamBooth")

MIN_IMAGE_SIDE = 64


def prepare_pixels(image: torch.Tensor, resolution: int) -> torch.Tensor:
    """[B, res, res, 3] in 0..1: RGB(A)/grayscale photos, centre square, antialiased resize."""
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
    pixels = image.float().clamp(0, 1)
    return torch.stack([center_square(p, resolution) for p in pixels]).contiguous()
