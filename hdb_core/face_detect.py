"""Find the largest face in a photo and cut a square, padded crop around it.

HyperDreamBooth works from one face photo framed like CelebA-HQ (head and some
hair, centred). Users bring arbitrary photos, so this module frames them.

Detection uses the Haar cascades that opencv-python(-headless) 4.x ships inside
its wheel: nothing to download, nothing compiled at install time, no
insightface/onnxruntime. (OpenCV 5 wheels no longer ship the cascades, hence
the `<5` pin in requirements.txt and the explicit error below.) Detection runs
on a downscaled grey copy; the crop itself is taken from the full-precision
float image so no quality is lost to uint8 round trips.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from hdb_core.errors import HDBError

# Frontal-face cascades tried in order; the second catches some faces the first misses.
CASCADES = ("haarcascade_frontalface_default.xml", "haarcascade_frontalface_alt2.xml")
DETECT_MAX_SIDE = 1024  # Haar cost grows with pixels; faces worth training on survive this downscale.
MIN_FACE_FRACTION = 0.06  # ignore "faces" smaller than this share of the short side (noise, texture).


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in pixels of the original image: left, top, width, height."""

    x: float
    y: float
    w: float
    h: float

    @property
    def area(self) -> float:
        return self.w * self.h


@lru_cache(maxsize=None)
def _cascade(name: str):
    try:
        import cv2
    except ImportError as e:  # pragma: no cover - the requirement makes this rare
        raise HDBError("Face detection needs OpenCV; install it with "
                       "`pip install 'opencv-python-headless>=4.5,<5'` in ComfyUI's Python.") from e
    path = os.path.join(getattr(getattr(cv2, "data", None), "haarcascades", "") or "", name)
    classifier = cv2.CascadeClassifier(path) if os.path.isfile(path) else None
    if classifier is None or classifier.empty():
        raise HDBError(f"OpenCV {cv2.__version__} does not ship the face model {name}; install an OpenCV 4 "
                       "wheel with `pip install 'opencv-python-headless>=4.5,<5'` in ComfyUI's Python.")
    return classifier


def _grey_uint8(image: torch.Tensor) -> tuple[np.ndarray, float]:
    """[H, W, C] float 0..1 -> (downscaled grey uint8 image, scale from it back to the original)."""
    import cv2

    rgb = image[..., :3].detach().float().clamp(0, 1)
    if rgb.shape[-1] == 1:
        grey = rgb[..., 0]
    else:
        grey = rgb @ torch.tensor([0.299, 0.587, 0.114], dtype=rgb.dtype, device=rgb.device)
    grey = (grey * 255).round().to(torch.uint8).cpu().numpy()
    h, w = grey.shape
    scale = max(h, w) / DETECT_MAX_SIDE
    if scale > 1:
        grey = cv2.resize(grey, (round(w / scale), round(h / scale)), interpolation=cv2.INTER_AREA)
    else:
        scale = 1.0
    return cv2.equalizeHist(grey), scale


def detect_faces(image: torch.Tensor) -> list[Box]:
    """Frontal faces in one [H, W, C] image with values in 0..1, largest first (may be empty)."""
    grey, scale = _grey_uint8(image)
    min_side = max(20, int(MIN_FACE_FRACTION * min(grey.shape)))
    for name in CASCADES:
        found = _cascade(name).detectMultiScale(grey, scaleFactor=1.1, minNeighbors=5,
                                                minSize=(min_side, min_side))
        if len(found):
            boxes = [Box(float(x) * scale, float(y) * scale, float(w) * scale, float(h) * scale)
                     for x, y, w, h in found]
            return sorted(boxes, key=lambda b: b.area, reverse=True)
    return []


def square_around(face: Box, margin: float) -> tuple[int, int, int]:
    """(left, top, side) of a square centred on `face`, `margin` x its size added on every side."""
    side = max(1, round(max(face.w, face.h) * (1 + 2 * margin)))
    cx, cy = face.x + face.w / 2, face.y + face.h / 2
    return round(cx - side / 2), round(cy - side / 2), side


def _fit(start: int, side: int, length: int) -> tuple[int, int, int]:
    """Shift [start, start+side) inside [0, length) if it fits; else centre it and pad.

    Returns (source start, pad before, pad after). Shifting keeps real pixels
    rather than padding; the face stays inside because it lies inside both.
    """
    if side <= length:
        return min(max(start, 0), length - side), 0, 0
    before = max(0, -start)
    after = max(0, start + side - length)
    return 0, before, after


def crop_square(image: torch.Tensor, left: int, top: int, side: int) -> torch.Tensor:
    """A [side, side, C] crop of [H, W, C]; replicates edge pixels where the square leaves the image."""
    h, w = image.shape[:2]
    x0, pad_l, pad_r = _fit(left, side, w)
    y0, pad_t, pad_b = _fit(top, side, h)
    crop = image[y0:y0 + side - pad_t - pad_b, x0:x0 + side - pad_l - pad_r]
    if pad_l or pad_r or pad_t or pad_b:
        chw = crop.permute(2, 0, 1).unsqueeze(0)
        chw = F.pad(chw, (pad_l, pad_r, pad_t, pad_b), mode="replicate")
        crop = chw[0].permute(1, 2, 0)
    return crop


def center_square(image: torch.Tensor, size: int) -> torch.Tensor:
    """[H, W, C] -> [size, size, C]: the centred square, resized as `resize_square` does."""
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return resize_square(image[top:top + side, left:left + side], size)


def resize_square(image: torch.Tensor, size: int) -> torch.Tensor:
    """[S, S, C] -> [size, size, C], antialiased when shrinking, values kept in 0..1."""
    if image.shape[0] == size and image.shape[1] == size:
        return image.clone()
    chw = image.permute(2, 0, 1).unsqueeze(0).float()
    out = F.interpolate(chw, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return out[0].permute(1, 2, 0).clamp(0, 1).to(image.dtype)


def face_crop(images: torch.Tensor, margin: float = 0.5, size: int = 512, on_image=None) -> torch.Tensor:
    """Crop each image of a [B, H, W, C] batch (0..1) to its largest face -> [B, size, size, C].

    margin: extra room on each side of the detected face box, as a fraction of its
    size (0.5 gives a square twice the face's size). Raises HDBError naming the
    first image of the batch in which no face is found. `on_image()` is called
    after each image (progress, cancel).
    """
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise HDBError(f"Face crop expects an IMAGE batch [B, H, W, C] with 1, 3 or 4 channels, got shape "
                       f"{tuple(images.shape)}; connect a Load Image output.")
    if margin < 0:
        raise HDBError(f"margin must be 0 or more (got {margin}); 0.5 gives a square twice the face's size.")
    if size < 8:
        raise HDBError(f"size must be at least 8 pixels (got {size}); use 512 for SD1.5.")
    crops = []
    count = images.shape[0]
    for i in range(count):
        faces = detect_faces(images[i])
        if not faces:
            raise HDBError(f"No face found in image {i + 1} of {count} in the batch (index {i}); use a photo "
                           "with one clear, frontal, well-lit face, or remove that image from the batch.")
        left, top, side = square_around(faces[0], margin)
        crops.append(resize_square(crop_square(images[i], left, top, side), size))
        if on_image is not None:
            on_image()
    return torch.stack(crops)
