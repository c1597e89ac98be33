"""Shared helpers of the training-pipeline tests: a tiny diffusers SD folder and synthetic identities.

Identities are coloured shapes (one colour/shape per identity) saved as PNG: the
pipeline's maths does not care whether pixels are faces, and tests run with
face_check='none' except where the face check itself is tested.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
_cache: dict = {}

# Small, fast settings shared by the tests (64 px images -> 8x8 latents).
FAST = ["--resolution", "64", "--face-check", "none", "--min-size", "32", "--no-progress"]
FAST_NET = ["--width", "32", "--heads", "2", "--depth", "1", "--iterations", "2", "--warmup-steps", "1"]


def make_faces(root: str, n: int, size: tuple[int, int] = (80, 72), per_folder: int = 0, start: int = 0) -> str:
    """n synthetic identities: `id<k>.png`, or folders `id<k>/` of `per_folder` images when per_folder > 0."""
    from PIL import Image, ImageDraw

    os.makedirs(root, exist_ok=True)
    for k in range(start, start + n):
        def draw(j: int, k: int = k) -> Image.Image:
            im = Image.new("RGB", size, ((53 * k) % 256, (97 * k + 40 * j) % 256, (151 * k + 90) % 256))
            d = ImageDraw.Draw(im)
            w, h = size
            d.ellipse((w // 8 + k % 5, h // 8 + j, w - w // 6, h - h // 5 - k % 4),
                      fill=((200 + 17 * k) % 256, (60 * k) % 256, (30 + 80 * j) % 256))
            return im
        if per_folder:
            os.makedirs(os.path.join(root, f"id{k:02d}"), exist_ok=True)
            for j in range(per_folder):
                draw(j).save(os.path.join(root, f"id{k:02d}", f"{j}.png"))
        else:
            draw(0).save(os.path.join(root, f"id{k:02d}.png"))
    return root


def tiny_folder(tmp_path_factory) -> str:
    """The tiny diffusers SD folder, built once per test session."""
    if "tiny" not in _cache:
        from devtools import tiny_diffusers

        _cache["tiny"] = tiny_diffusers.save(str(tmp_path_factory.mktemp("tiny_sd") / "model"), "tiny", seed=0)
    return _cache["tiny"]


def hdb(*args: str, env: dict | None = None, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the `hdb` CLI in a fresh process (as a user would), with one thread for stable timings."""
    full_env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run([PYTHON, "-m", "hdb_core.cli", *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"hdb {args[0]} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return tiny_folder(tmp_path_factory)


@pytest.fixture(scope="session")
def base(tiny_model):
    """The loaded tiny base model (CPU, fp32); tests must not change its weights."""
    from hdb_core.training.base_model import load_base_model

    return load_base_model(tiny_model).to("cpu")
