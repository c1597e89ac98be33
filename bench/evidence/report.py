"""Summaries of the experiment: the results table, the paper's ordering checks and the plot (Pillow only)."""
from __future__ import annotations

import statistics

from PIL import Image, ImageDraw, ImageFont

from .run import CONTROL_FULL, CONTROL_PREDICTION, CONTROL_TEACHER, METRIC_NAMES, METRICS, RAW, Settings


def stats(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def rows(result: dict, s: Settings) -> list[tuple[str, dict[str, list[float]]]]:
    c = result["curves"]
    return [
        ("base model (no LiDB)", c["zero"][0]),
        ("hypernet only (s=1)", c["hypernet s=1"][0]),
        (f"hypernet only (s={s.iterations})", c["hypernet"][0]),
        (f"hypernet s=1 + {s.hyper_steps} steps", c["hypernet s=1"][s.hyper_steps]),
        (f"hypernet + {s.hyper_steps} steps (full method)", c["hypernet"][s.hyper_steps]),
        (f"zero start + {s.hyper_steps} steps", c["zero"][s.hyper_steps]),
        (f"zero start + {s.zero_steps} steps", c["zero"][s.zero_steps]),
        ("teacher (generated the photos)", result["refs"]["teacher"]),
        (f"control: {CONTROL_TEACHER}", result["refs"][CONTROL_TEACHER]),
        (f"control: {CONTROL_PREDICTION}", result["refs"][CONTROL_PREDICTION]),
        (f"control: another identity's hypernet + {s.hyper_steps} steps", result["refs"][CONTROL_FULL]),
    ]


def table(result: dict, s: Settings) -> str:
    n = len(result["manifest"]["held_out"])
    head = (f"| start (held-out identities: {n}, one photo each) | "
            + " | ".join(METRIC_NAMES[m] for m in METRICS) + " |")
    lines = [head, "|" + "---|" * (len(METRICS) + 1)]
    for name, m in rows(result, s):
        cells = [f"{a:.4f} ± {b:.4f}" for a, b in (stats(m[k]) for k in METRICS)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def steps_to_match(result: dict, s: Settings, metric: str) -> int | None:
    """Fewest zero-start steps (on the measured curve) whose mean is as good as hypernet + hyper_steps."""
    target = stats(result["curves"]["hypernet"][s.hyper_steps][metric])[0]
    for step in sorted(result["curves"]["zero"]):
        if stats(result["curves"]["zero"][step][metric])[0] <= target:
            return step
    return None


def ordering(result: dict, s: Settings, metric: str = "loss") -> dict:
    """The paper's claims as numbers: paired per-identity differences (positive = full method better)."""
    c = result["curves"]
    full = c["hypernet"][s.hyper_steps][metric]

    def diff(other):
        return [o - f for o, f in zip(other, full)]

    match = steps_to_match(result, s, metric)
    return {
        "vs_zero_long": diff(c["zero"][s.zero_steps][metric]),
        "vs_zero_short": diff(c["zero"][s.hyper_steps][metric]),
        "vs_hypernet_only": diff(c["hypernet"][0][metric]),
        "vs_s1": diff(c["hypernet s=1"][s.hyper_steps][metric]),
        "zero_steps_to_match": match,
        "ratio": (match / s.hyper_steps) if match is not None else None,
        "ratio_lower_bound": max(c["zero"]) / s.hyper_steps,
    }


def specificity(result: dict, s: Settings, metric: str = "loss") -> dict:
    """Paired per identity on its own photos: another identity's LiDB minus its own (positive = identity-specific)."""
    c, r = result["curves"], result["refs"]
    base = c["zero"][0][metric]
    return {
        "teacher": [o - w for o, w in zip(r[CONTROL_TEACHER][metric], r["teacher"][metric])],
        "teacher_vs_base": [b - w for b, w in zip(base, r["teacher"][metric])],
        "other_teacher_vs_base": [o - b for o, b in zip(r[CONTROL_TEACHER][metric], base)],
        "prediction": [o - w for o, w in zip(r[CONTROL_PREDICTION][metric], c["hypernet"][0][metric])],
        "full": [o - w for o, w in zip(r[CONTROL_FULL][metric], c["hypernet"][s.hyper_steps][metric])],
        "raw_teacher_vs_base": [b - w for b, w in zip(r[RAW]["base"], r[RAW]["teacher"])],
        "raw_other_vs_base": [o - b for o, b in zip(r[RAW]["other teacher"], r[RAW]["base"])],
    }


def specificity_text(result: dict, s: Settings) -> str:
    sp = specificity(result, s)
    m = result["manifest"]

    def fmt(d):
        mean, sd = stats(d)
        return f"{mean:+.4f} ± {sd:.4f} ({sum(x > 0 for x in d)}/{len(d)})"

    return ("identity in the photos: mean squared latent distance between two photos of one identity "
            f"{m['photo_distance_within']:.2f}, between the photo means of two identities "
            f"{m['identity_distance_between']:.2f}\n"
            f"held-out loss on an identity's own photos, paired (positive = the first is worse): "
            f"base - own teacher {fmt(sp['teacher_vs_base'])}; "
            f"other teacher - base {fmt(sp['other_teacher_vs_base'])}; "
            f"other - own, teacher {fmt(sp['teacher'])}; hypernet prediction {fmt(sp['prediction'])}; "
            f"hypernet + {s.hyper_steps} steps {fmt(sp['full'])}\n"
            f"the same on the teacher's sampled latents before the VAE round trip (VAE relative error "
            f"{m['vae_error']:.3f}): base - own teacher {fmt(sp['raw_teacher_vs_base'])}; "
            f"other teacher - base {fmt(sp['raw_other_vs_base'])}")


def ordering_text(result: dict, s: Settings) -> str:
    out = [specificity_text(result, s)]
    for metric in METRICS:
        o = ordering(result, s, metric)
        parts = []
        for key, label in (("vs_zero_long", f"zero+{s.zero_steps}"), ("vs_zero_short", f"zero+{s.hyper_steps}"),
                           ("vs_hypernet_only", "hypernet only"), ("vs_s1", f"s=1 +{s.hyper_steps}")):
            m, sd = stats(o[key])
            wins = sum(d > 0 for d in o[key])
            parts.append(f"{label}: {m:+.4f} ± {sd:.4f} ({wins}/{len(o[key])} identities better)")
        ratio = (f"{o['ratio']:.1f}x (zero start needs {o['zero_steps_to_match']} steps)" if o["ratio"] is not None
                 else f"> {o['ratio_lower_bound']:.0f}x (zero start never matches "
                      f"within {max(result['curves']['zero'])} steps)")
        out.append(f"{METRIC_NAMES[metric]} — full method (hypernet+{s.hyper_steps}) better than " + "; ".join(parts)
                   + f"; steps-to-equal-quality ratio {ratio}")
    return "\n".join(out)


COLOURS = {"zero": (200, 60, 40), "hypernet": (40, 90, 200), "hypernet s=1": (60, 160, 80)}


def plot(result: dict, path: str, metric: str = "loss") -> str:
    """Quality against finetuning steps, one curve (mean ± std band) per start; x axis is log(1 + steps)."""
    import math

    w, h, ml, mr, mt, mb = 760, 420, 70, 20, 36, 46
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    curves = result["curves"]
    all_v = [v for c in curves.values() for m in c.values() for v in (stats(m[metric])[0] - stats(m[metric])[1],
                                                                        stats(m[metric])[0] + stats(m[metric])[1])]
    teacher = stats(result["refs"]["teacher"][metric])[0]
    lo, hi = min(all_v + [teacher]), max(all_v + [teacher])
    pad = 0.05 * (hi - lo or 1)
    lo, hi = lo - pad, hi + pad
    xmax = math.log1p(max(step for c in curves.values() for step in c))

    def xy(step, v):
        return (ml + (w - ml - mr) * math.log1p(step) / xmax, mt + (h - mt - mb) * (hi - v) / (hi - lo))

    d.rectangle([ml, mt, w - mr, h - mb], outline="black")
    for step in (0, 10, 40, 100, 400, 1000):
        if math.log1p(step) <= xmax:
            x, _ = xy(step, lo)
            d.line([x, h - mb, x, h - mb + 4], fill="black")
            d.text((x - 8, h - mb + 6), str(step), fill="black", font=font)
    for k in range(5):
        v = lo + (hi - lo) * k / 4
        _, y = xy(0, v)
        d.text((4, y - 6), f"{v:.4f}", fill="black", font=font)
    _, yt = xy(0, teacher)
    d.line([ml, yt, w - mr, yt], fill=(150, 150, 150), width=1)
    d.text((w - mr - 110, yt - 12), "teacher", fill=(120, 120, 120), font=font)
    for i, (name, c) in enumerate(curves.items()):
        col = COLOURS.get(name, (0, 0, 0))
        pts = [(step, *stats(c[step][metric])) for step in sorted(c)]
        for step, m, sd in pts:
            x, y0 = xy(step, m - sd)
            _, y1 = xy(step, m + sd)
            d.line([x, y0, x, y1], fill=col)
        d.line([xy(step, m) for step, m, _ in pts], fill=col, width=2)
        for step, m, _ in pts:
            x, y = xy(step, m)
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=col)
        d.text((ml + 10, mt + 8 + 14 * i), f"start: {name}", fill=col, font=font)
    d.text((ml, 10), f"{METRIC_NAMES[metric]} (lower is better) against finetuning steps; mean ± std over "
                     f"{len(result['manifest']['held_out'])} held-out identities", fill="black", font=font)
    d.text((w // 2 - 60, h - 18), "finetuning steps (log scale)", fill="black", font=font)
    img.save(path)
    return path
