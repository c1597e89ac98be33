"""A loss curve drawn with Pillow, returned as a ComfyUI-style IMAGE tensor.

Diffusion losses at random timesteps are noisy step to step, so the raw losses
are drawn as thin grey points/lines and a running mean on top shows the trend.
No plotting library is needed.
"""
from __future__ import annotations

import math

import torch
from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT = 640, 360
_MARGIN_L, _MARGIN_R, _MARGIN_T, _MARGIN_B = 64, 16, 32, 36


def running_mean(values: list[float], window: int) -> list[float]:
    """Centred moving average (shorter windows at the ends), so the trend does not lag."""
    half = max(0, window // 2)
    out = []
    for i in range(len(values)):
        part = values[max(0, i - half): i + half + 1]
        out.append(sum(part) / len(part))
    return out


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.2e}"


def loss_curve_image(losses: list[float], title: str) -> torch.Tensor:
    """[1, H, W, 3] float32 in 0..1: raw losses (grey) and their running mean (blue) over the steps."""
    img = loss_curve_pil(losses, title)
    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(HEIGHT, WIDTH, 3)
    return (data.float() / 255.0).unsqueeze(0)


MARK_COLOURS = ((220, 60, 30), (20, 150, 70), (150, 60, 180))


def loss_curve_pil(losses: list[float], title: str,
                   marks: dict[str, list[tuple[int, float]]] | None = None) -> Image.Image:
    """The same plot as a PIL RGB image (for progress previews).

    `marks`: named series of (step, value) drawn as coloured points on the same axes
    (held-out losses, logged every few hundred steps).
    """
    marks = {k: v for k, v in (marks or {}).items() if v}
    img = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    x0, x1 = _MARGIN_L, WIDTH - _MARGIN_R
    y0, y1 = _MARGIN_T, HEIGHT - _MARGIN_B
    draw.text((x0, 8), title, fill="black", font=font)
    draw.line([(x0, y0), (x0, y1), (x1, y1)], fill="black", width=1)
    finite = [v for v in losses if math.isfinite(v)]
    if not finite:
        draw.text((x0 + 10, (y0 + y1) // 2), "no finite loss values", fill="black", font=font)
    else:
        extra = [v for series in marks.values() for _, v in series if math.isfinite(v)]
        lo, hi = min(finite + extra), max(finite + extra)
        span = (hi - lo) or max(abs(hi), 1.0) * 1e-3
        n = len(losses)

        def point(i: int, v: float) -> tuple[float, float]:
            x = x0 + (x1 - x0) * (i / (n - 1) if n > 1 else 0.5)
            return x, y1 - (y1 - y0) * (v - lo) / span

        raw = [point(i, v) for i, v in enumerate(losses) if math.isfinite(v)]
        if len(raw) > 1:
            draw.line(raw, fill=(170, 170, 170), width=1)
        for x, y in raw:
            draw.ellipse([x - 1.5, y - 1.5, x + 1.5, y + 1.5], fill=(140, 140, 140))
        smooth = running_mean(finite, max(1, len(finite) // 8)) if len(finite) == n else None
        if smooth and n > 1:
            draw.line([point(i, v) for i, v in enumerate(smooth)], fill=(30, 80, 200), width=3)
        for series, colour in zip(marks.values(), MARK_COLOURS):
            points = [point(step - 1, v) for step, v in series if math.isfinite(v)]
            if len(points) > 1:
                draw.line(points, fill=colour, width=2)
            for x, y in points:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        for row, ((name, _), colour) in enumerate(zip(marks.items(), MARK_COLOURS)):
            draw.text((x0 + 10, y0 + 4 + 12 * row), name, fill=colour, font=font)
        draw.text((4, y0 - 6), _fmt(hi), fill="black", font=font)
        draw.text((4, y1 - 6), _fmt(lo), fill="black", font=font)
        draw.text((x0, y1 + 6), "1", fill="black", font=font)
        draw.text((x1 - 30, y1 + 6), str(n), fill="black", font=font)
        draw.text(((x0 + x1) // 2 - 15, y1 + 16), "step", fill="black", font=font)
        w = max(1, len(finite) // 4)
        first, last = sum(finite[:w]) / w, sum(finite[-w:]) / w
        draw.text((x1 - 260, 8), f"mean of first/last {w}: {_fmt(first)} -> {_fmt(last)}",
                  fill=(30, 80, 200), font=font)
    return img


def save_loss_png(losses: list[float], title: str, path: str,
                  marks: dict[str, list[tuple[int, float]]] | None = None) -> str | None:
    """The loss curve (and marks) as a PNG, written atomically; nothing when there are no losses."""
    if not losses:
        return None
    from hdb_core.atomic import write_atomic

    image = loss_curve_pil(losses, title, marks)
    return write_atomic(path, lambda tmp: image.save(tmp, format="PNG"))
