"""Face datasets for training: one identity per image, or one folder of images per identity.

    faces/                      faces/
      0001.jpg   -> id "0001"     alice/ a.jpg b.png   -> id "alice" (2 images)
      0002.png   -> id "0002"     bob/   1.jpg         -> id "bob"

`scan` only reads image headers (fast even for 15K files) so that an empty
folder or a folder of 8x8 thumbnails fails at once, before any model loads.
Decoding, the optional face check and preprocessing happen when an identity is
trained (`load_identity`). A bad file never stops a run: it is skipped, its
reason logged and counted in `Skips`.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field

import torch

from hdb_core import face_detect
from hdb_core.errors import HDBError

log = logging.getLogger("hdb")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FACE_CHECKS = ("none", "detect", "crop")


@dataclass(frozen=True)
class Identity:
    id: str
    paths: tuple[str, ...]


@dataclass
class Skips:
    """Files and identities left out, with the reason; summarised at the end of a run."""

    items: list[tuple[str, str]] = field(default_factory=list)

    def add(self, path: str, reason: str) -> None:
        self.items.append((path, reason))
        log.warning("skipped %s: %s", path, reason)

    def counts(self) -> dict[str, int]:
        return dict(Counter(reason.split(" (")[0] for _, reason in self.items))

    def summary(self) -> str:
        if not self.items:
            return "no images skipped"
        parts = ", ".join(f"{n} {why}" for why, n in sorted(self.counts().items()))
        return f"{len(self.items)} skipped ({parts})"


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _header_problem(path: str, min_size: int) -> str | None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            w, h = im.size
    except (UnidentifiedImageError, OSError, ValueError) as e:
        return f"unreadable ({type(e).__name__})"
    if min(w, h) < min_size:
        return f"too small ({w}x{h} px, need at least {min_size})"
    return None


def scan(root: str, min_size: int = 128, skips: Skips | None = None) -> list[Identity]:
    """Identities under `root`, sorted by id; unreadable or too small images skipped (header check only)."""
    if not os.path.isdir(root):
        raise HDBError(f"Dataset folder '{root}' does not exist; give a folder with one face image per identity "
                       f"or one subfolder of images per identity.")
    skips = skips if skips is not None else Skips()
    found: dict[str, list[str]] = {}
    total = 0
    for entry in sorted(os.listdir(root)):
        full = os.path.join(root, entry)
        if os.path.isdir(full) and not entry.startswith("."):
            paths = [os.path.join(full, n) for n in sorted(os.listdir(full)) if _is_image(n)]
            ident = entry
        elif os.path.isfile(full) and _is_image(entry):
            paths, ident = [full], os.path.splitext(entry)[0]
        else:
            continue
        if ident in found:
            raise HDBError(f"Identity '{ident}' appears twice in '{root}' (as an image and as a folder, or with two "
                           f"extensions); rename one of them.")
        good = []
        for p in paths:
            total += 1
            why = _header_problem(p, min_size)
            if why:
                skips.add(p, why)
            else:
                good.append(p)
        if good:
            found[ident] = good
    if not found:
        if total == 0:
            raise HDBError(f"Dataset folder '{root}' holds no images ({', '.join(IMAGE_EXTENSIONS)}); put one face "
                           f"image per identity there, or one subfolder of images per identity.")
        raise HDBError(f"None of the {total} images in '{root}' is usable ({skips.summary()}); use face images of at "
                       f"least {min_size} px on the short side.")
    return [Identity(k, tuple(v)) for k, v in found.items()]


def load_rgb(path: str) -> torch.Tensor:
    """[H, W, 3] float in 0..1 (EXIF rotation applied)."""
    import numpy as np
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
        arr = np.asarray(im, dtype=np.float32) / 255.0
    return torch.from_numpy(arr.copy())


def prepare_image(path: str, size: int, face_check: str = "detect") -> torch.Tensor:
    """One training image [size, size, 3] in 0..1; raises ValueError(reason) when it must be skipped."""
    from PIL import UnidentifiedImageError

    if face_check not in FACE_CHECKS:
        raise HDBError(f"face_check must be one of {', '.join(FACE_CHECKS)}, not {face_check!r}.")
    try:
        image = load_rgb(path)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"unreadable ({type(e).__name__})") from None
    if face_check != "none":
        faces = face_detect.detect_faces(image)
        if not faces:
            raise ValueError("no face found")
        if face_check == "crop":
            left, top, side = face_detect.square_around(faces[0], 0.5)
            return face_detect.resize_square(face_detect.crop_square(image, left, top, side), size)
    return face_detect.center_square(image, size)


def load_identity(identity: Identity, size: int, face_check: str, skips: Skips) -> torch.Tensor | None:
    """[K, size, size, 3] for the identity's usable images, or None (and a skip entry) when none is usable."""
    images = []
    for p in identity.paths:
        try:
            images.append(prepare_image(p, size, face_check))
        except ValueError as e:
            skips.add(p, str(e))
    if not images:
        skips.add(identity.id, "identity without usable images")
        return None
    return torch.stack(images)


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """[K, H, W, 3] in 0..1 -> [K, 3, H, W] in -1..1 (what the VAE encoder expects)."""
    return images.permute(0, 3, 1, 2) * 2.0 - 1.0
