"""Summaries of the experiment: world and gate lines, the identity table, the paired CIs, the goals, the plot."""
from __future__ import annotations

import statistics

from PIL import Image, ImageDraw, ImageFont

from .run import RELAXED, SUBSPACE_NET, Settings


def stats(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def gate_text(result: dict) -> str:
    g, w = result["gate"], result["world_stats"]
    lines = [
        f"world: VAE round-trip relative error {w['vae_error']:.4f}; mean squared latent distance of two teacher "
        f"samples of one identity {w['photo_distance_within']:.1f}, of two identities "
        f"{w['identity_distance_between']:.1f} (distance ratio {w['distance_ratio']:.3f}); encoded photos "
        f"{w['encoded_distance_within']:.1f} vs {w['encoded_distance_between']:.1f} (ratio "
        f"{w['encoded_distance_ratio']:.3f}); in the recognizer space (held-out identities) ratio "
        f"{w['recognizer_ratio']:.3f}; two base-model samples {w['base_spread']:.1f}",
        f"world: held-out identities identified from their 4 photos' latents as sampled: rank-1 "
        f"{w['photos_raw_rank1']:.2f} (one photo {w['photos_raw_one_rank1']:.2f}); after decoding, PNG and the "
        f"VAE encoder: {w['photos_encoded_rank1']:.2f} (one photo {w['photos_encoded_one_rank1']:.2f})",
        f"world: the test identities' input photo itself, judged as one sample: rank-1 "
        f"{w['input_photo_test_rank1']:.0f}/{w['input_photo_test_identities']:.0f}, "
        f"cosine {w['input_photo_test_cos']:.3f} (what a finetune on that one photo has to copy)",
        f"GATE: teacher beats the base model on identity cosine for {g['wins']}/{g['identities']} held-out "
        f"identities (need 90 %): {'PASSED' if g['passed'] else 'FAILED'}; rank-1 teacher "
        f"{g['teacher_rank1']:.2f}, base {g['base_rank1']:.2f}",
    ]
    if not g["passed"]:
        lines.append("!!! GATE FAILED: the world's teachers do not carry identity the recognizer can see; "
                     "nothing below would measure identity, so the comparison was not run. !!!")
    return "\n".join(lines)


def arm_rows(result: dict, s: Settings) -> list[tuple[str, dict[str, list[float]], str]]:
    arms, refs, lrs = result["arms"], result["refs"], result["lrs"]
    rows = [("base model (no LiDB)", refs["base"], "")]
    for p in s.hyper_points:
        name = "hypernet only" if p == 0 else f"hypernet + {p} steps"
        rows.append((name, arms[f"hypernet+{p}"], f"{lrs[f'hypernet+{p}']:g}" if p else ""))
    for p in s.zero_points:
        rows.append((f"zero start + {p} steps", arms[f"zero+{p}"], f"{lrs[f'zero+{p}']:g}"))
    if any(arm.startswith("hypernet-sub+") for arm in arms):
        rows += [(f"hypernet + {p} steps in the identity subspace", arms[f"hypernet-sub+{p}"],
                  f"{lrs[f'hypernet-sub+{p}']:g}") for p in s.subspace_hyper_points]
        rows += [(f"subspace mean + {p} steps in the identity subspace", arms[f"mean-sub+{p}"],
                  f"{lrs[f'mean-sub+{p}']:g}") for p in s.subspace_mean_points]
    if f"{SUBSPACE_NET}+0" in arms:
        rows += [("subspace hypernet only" if p == 0 else f"subspace hypernet + {p} steps in its subspace",
                  arms[f"{SUBSPACE_NET}+{p}"], f"{lrs[f'{SUBSPACE_NET}+{p}']:g}" if p else "")
                 for p in (0, *s.subspace_hyper_points)]
        rows += [(f"subspace hypernet + {p} steps (default relaxation)", arms[f"{RELAXED}+{p}"],
                  f"{lrs[f'{RELAXED}+{p}']:g}") for p in s.hyper_points if p]
    if s.single_pass_network:
        k = s.key_steps[0]
        rows += [("hypernet trained with s = 1, only", arms["hypernet(s=1)+0"], ""),
                 (f"hypernet trained with s = 1, + {k} steps", arms[f"hypernet(s=1)+{k}"],
                  f"{lrs[f'hypernet+{k}']:g}")]
    rows += [("teacher (generated the photos)", refs["teacher"], ""),
             ("control: another identity's teacher", refs["another identity's teacher"], ""),
             ("control: another identity's hypernet prediction", refs["another identity's hypernet prediction"], "")]
    return rows


def table(result: dict, s: Settings) -> str:
    n = len(result["test"])
    lines = [f"| arm ({n} test identities, one photo each; {s.draws} draws per finetune step) | lr "
             "| rank-1 identification | cosine to own identity | style kept | cosine, styled prompt | held-out loss "
             "| prior drift |",
             "|---|---|---|---|---|---|---|---|"]
    for name, m, lr in arm_rows(result, s):
        r1 = sum(m["rank1"])
        c, cs = stats(m["cos"])
        st, sts = stats(m["style"])
        sc, scs = stats(m["styled_cos"])
        lo, los = stats(m["loss"])
        d, ds = stats(m["drift"])
        lines.append(f"| {name} | {lr} | {r1 / len(m['rank1']):.2f} ({r1:.0f}/{len(m['rank1'])}) | "
                     f"{c:.3f} ± {cs:.3f} | {st:.2f} ± {sts:.2f} | {sc:.3f} ± {scs:.3f} | {lo:.4f} ± {los:.4f} | "
                     f"{d:.1f} ± {ds:.1f} |")
    return "\n".join(lines)


def ci_text(result: dict) -> str:
    lines = ["| paired difference (test identities) | mean | bootstrap 95 % CI |", "|---|---|---|"]
    for label, (m, lo, hi) in result["cis"].items():
        lines.append(f"| {label} | {m:+.3f} | [{lo:+.3f}, {hi:+.3f}] |")
    return "\n".join(lines)


def count(m: dict) -> str:
    """Rank-1 hits as 'hits/identities'."""
    return f"{sum(m['rank1']):.0f}/{len(m['rank1'])}"


def interval(cis: dict, key: str) -> str:
    """A paired difference and its 95 % interval; drift (tens) to one decimal, the rest to three."""
    m, lo, hi = cis[key]
    digits = 1 if key.endswith("[drift]") else 3
    return f"{m:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def goals(result: dict) -> dict[str, tuple[bool, str]]:
    """The issue's goals this run can judge: name -> (reached, the numbers that decide it)."""
    k, long = key_steps_of(result)
    arms, refs, cis = result["arms"], result["refs"], result["cis"]
    teacher = statistics.fmean(refs["teacher"]["rank1"])
    starts = [("hypernet", "hypernet", True)]
    if f"hypernet-sub+{k} - zero+{long} [cos]" in cis:
        starts.append(("hypernet-sub", "hypernet, finetuned in the identity subspace,", False))
    if f"{SUBSPACE_NET}+{k} - zero+{long} [cos]" in cis:
        starts.append((SUBSPACE_NET, "subspace hypernet, finetuned in its subspace,", True))
        starts.append((RELAXED, "subspace hypernet, finetuned with the default relaxation,", False))
    out = {}
    for arm, label, alone in starts:
        vs_long, vs_k = f"{arm}+{k} - zero+{long}", f"{arm}+{k} - zero+{k}"
        if alone:
            alone_arm = arms[f"{arm}+0"]
            out[f"{label.split(',')[0]} only: rank-1 at least half the teacher's"] = (
                statistics.fmean(alone_arm["rank1"]) >= 0.5 * teacher,
                f"{count(alone_arm)} against the teacher's {count(refs['teacher'])}")
        out.update({
            f"{label} + {k} at least as good as zero + {long} (mean cosine and rank-1 differences >= 0)": (
                cis[f"{vs_long} [cos]"][0] >= 0 and cis[f"{vs_long} [rank1]"][0] >= 0,
                f"{count(arms[f'{arm}+{k}'])} against {count(arms[f'zero+{long}'])}, cosine "
                f"{interval(cis, f'{vs_long} [cos]')}"),
            f"{label} + {k}: editability and prior drift equal or better than zero + {long}'s (style kept not "
            f"below, drift not above, beyond the 95 % interval)": (
                cis[f"{vs_long} [style]"][2] >= 0 and cis[f"{vs_long} [drift]"][1] <= 0,
                f"style kept {interval(cis, f'{vs_long} [style]')}, drift {interval(cis, f'{vs_long} [drift]')}"),
            f"{label} + {k} clearly better than zero + {k} (cosine CI lower end > 0)": (
                cis[f"{vs_k} [cos]"][1] > 0, f"cosine {interval(cis, f'{vs_k} [cos]')}"),
        })
    return out


def goals_text(result: dict) -> str:
    return "\n".join(f"goal {'REACHED' if ok else 'NOT reached'}: {name}: {numbers}"
                     for name, (ok, numbers) in goals(result).items())


def summary(runs: dict[str, dict]) -> str:
    """Finished runs side by side (name -> results.json): the main arms' identity, editability and drift, then
    each goal's verdict with the numbers that decide it; what README quotes."""
    first = next(iter(runs.values()))
    k, long = key_steps_of(first)
    rows = [("base model", "base"), ("hypernet only", "hypernet+0"), (f"hypernet + {k} steps", f"hypernet+{k}"),
            (f"hypernet + {k} steps in the identity subspace", f"hypernet-sub+{k}"),
            ("subspace hypernet only", f"{SUBSPACE_NET}+0"),
            (f"subspace hypernet + {k} steps in its subspace", f"{SUBSPACE_NET}+{k}"),
            (f"zero start + {k} steps", f"zero+{k}"), (f"zero start + {long} steps", f"zero+{long}"),
            ("teacher (generated the photos)", "teacher")]
    head = f"| start ({len(first['test'])} test identities) | " + " | ".join(
        f"{name}: rank-1 | cosine | style kept | prior drift" for name in runs) + " |"
    lines = [head, "|---|" + "---|---|---|---|" * len(runs)]
    for label, key in rows:
        cells = []
        for result in runs.values():
            m = result["arms"].get(key) or result["refs"].get(key)
            cells.append(" | ".join(("–",) * 4) if m is None else
                         f"{count(m)} | {stats(m['cos'])[0]:.3f} | {stats(m['style'])[0]:.2f} | "
                         f"{stats(m['drift'])[0]:.1f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    verdicts = {name: goals(result) for name, result in runs.items()}
    names = list(dict.fromkeys(g for v in verdicts.values() for g in v))
    lines += ["", "| goal | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
    for goal in names:
        cells = [("**reached**: " if v[goal][0] else "not reached: ") + v[goal][1] if goal in v else "–"
                 for v in verdicts.values()]
        lines.append(f"| {goal} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


COLOURS = {"zero": (200, 60, 40), "hypernet": (40, 90, 200), "hypernet(s=1)": (60, 160, 60),
           "hypernet-sub": (140, 40, 170), "mean-sub": (220, 150, 30), SUBSPACE_NET: (20, 150, 150),
           RELAXED: (20, 110, 90)}


def plot_tradeoff(result: dict, path: str) -> str:
    """Identity (cosine) against editability (style kept) for the arms the goals compare: up and right is
    better. A line joins each prediction to its k-step finetune."""
    starts, k, points = compared_points(result, "style")
    base = result["refs"]["base"]
    w, h, ml, mr, mt, mb = 860, 460, 60, 20, 36, 46
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    xs, ys = [x for x, _, _ in points.values()], [y for _, y, _ in points.values()]
    x_lo, x_hi = min(xs + [0.0]), max(xs)
    y_lo, y_hi = min(ys), max(ys)
    x_pad, y_pad = 0.08 * (x_hi - x_lo or 1), 0.08 * (y_hi - y_lo or 1)
    x_lo, x_hi, y_lo, y_hi = x_lo - x_pad, x_hi + 3 * x_pad, y_lo - y_pad, y_hi + y_pad

    def xy(x, y):
        return (ml + (w - ml - mr) * (x - x_lo) / (x_hi - x_lo), mt + (h - mt - mb) * (y_hi - y) / (y_hi - y_lo))

    d.rectangle([ml, mt, w - mr, h - mb], outline="black")
    for i in range(5):
        xv, yv = x_lo + (x_hi - x_lo) * i / 4, y_lo + (y_hi - y_lo) * i / 4
        x, _ = xy(xv, y_lo)
        d.text((x - 10, h - mb + 6), f"{xv:.2f}", fill="black", font=font)
        _, y = xy(x_lo, yv)
        d.text((4, y - 6), f"{yv:.3f}", fill="black", font=font)
    draw_points(d, font, xy, starts, k, points, w - mr)
    d.text((ml, 10), f"identity cosine against style kept (1 = the base's full edit); means over "
                     f"{len(result['test'])} test identities; base model: cosine {stats(base['cos'])[0]:.3f}, "
                     f"style kept {stats(base['style'])[0]:.2f}", fill="black", font=font)
    d.text((w // 2 - 90, h - 18), "editability: share of the ' in red' edit kept", fill="black", font=font)
    img.save(path)
    return path


def log_x_axes(d, font, xy, ticks, x_max_log: float, y_lo: float, y_hi: float, box) -> None:
    """The plot's frame, the ticks of a log(1 + x) axis up to x_max_log, and five values on the y axis."""
    import math

    left, top, right, bottom = box
    d.rectangle([left, top, right, bottom], outline="black")
    for tick in ticks:
        if math.log1p(tick) <= x_max_log:
            x, _ = xy(tick, y_lo)
            d.line([x, bottom, x, bottom + 4], fill="black")
            d.text((x - 8, bottom + 6), str(tick), fill="black", font=font)
    for i in range(5):
        value = y_lo + (y_hi - y_lo) * i / 4
        d.text((4, xy(0, value)[1] - 6), f"{value:.3f}", fill="black", font=font)


def key_steps_of(result: dict) -> tuple[int, int]:
    """(k, long) as the run's Settings had them, read back from its arm names (so a results.json suffices)."""
    steps = {kind: [int(a.split("+")[1]) for a in result["arms"] if a.split("+")[0] == kind]
             for kind in ("hypernet", "zero")}
    return max(steps["hypernet"]), max(steps["zero"])


def compared_points(result: dict, x_metric: str) -> tuple[list[str], int, dict]:
    """The arms the goals compare, and the teacher: name -> (mean x_metric, mean cosine, colour); also the
    starts that have a prediction alone and k, so a plot can join each prediction to its k-step finetune."""
    k, long = key_steps_of(result)
    arms = result["arms"]
    starts = [kind for kind in ("hypernet", SUBSPACE_NET) if f"{kind}+0" in arms]
    shown = [f"{kind}+{p}" for kind in starts for p in (0, k)]
    shown += [arm for arm in (f"hypernet-sub+{k}", f"{RELAXED}+{k}", f"zero+{k}", f"zero+{long}") if arm in arms]
    points = {arm: (stats(arms[arm][x_metric])[0], stats(arms[arm]["cos"])[0],
                    COLOURS.get(arm.split("+")[0], (0, 0, 0))) for arm in shown}
    teacher = result["refs"]["teacher"]
    points["teacher"] = (stats(teacher[x_metric])[0], stats(teacher["cos"])[0], (110, 110, 110))
    return starts, k, points


def draw_points(d, font, xy, starts: list[str], k: int, points: dict, right: float) -> None:
    """Each start's line from its prediction to + k, then the points, each labelled where no other label is."""
    for kind in starts:
        d.line([xy(*points[f"{kind}+0"][:2]), xy(*points[f"{kind}+{k}"][:2])], fill=points[f"{kind}+0"][2], width=2)
    placed: list[tuple[float, float, float, float]] = []
    for name, (x, y, col) in sorted(points.items(), key=lambda item: -item[1][1]):
        px, py = xy(x, y)
        d.ellipse([px - 4, py - 4, px + 4, py + 4], fill=col)
        width = d.textlength(name, font=font)
        lx = px + 8 if px + 8 + width < right else px - 8 - width
        ly = py - 6
        while any(lx < b[2] and lx + width > b[0] and ly < b[3] and ly + 12 > b[1] for b in placed):
            ly += 12      # below the labels already placed, so none hides another
        placed.append((lx, ly, lx + width, ly + 12))
        d.text((lx, ly), name, fill=col, font=font)


def plot_drift(result: dict, path: str) -> str:
    """Identity cosine against prior drift for the arms the goals compare: up and left is better. A line joins
    each prediction to its k-step finetune; the x axis is log(1 + drift), as drift spans 0 to the teachers'."""
    import math

    starts, k, points = compared_points(result, "drift")
    base_cos = stats(result["refs"]["base"]["cos"])[0]
    w, h, ml, mr, mt, mb = 860, 460, 60, 20, 36, 46
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    x_hi = math.log1p(max(x for x, _, _ in points.values()) * 1.3)
    ys = [y for _, y, _ in points.values()]
    y_lo, y_hi = min(ys), max(ys)
    y_lo, y_hi = y_lo - 0.08 * (y_hi - y_lo or 1), y_hi + 0.08 * (y_hi - y_lo or 1)

    def xy(drift, y):
        return ml + (w - ml - mr) * math.log1p(drift) / x_hi, mt + (h - mt - mb) * (y_hi - y) / (y_hi - y_lo)

    log_x_axes(d, font, xy, (0, 1, 3, 10, 30, 100, 300), x_hi, y_lo, y_hi, (ml, mt, w - mr, h - mb))
    draw_points(d, font, xy, starts, k, points, w - mr)
    d.text((ml, 10), f"identity cosine against prior drift (\"a face\" moved from the base's); means over "
                     f"{len(result['test'])} test identities; base model: cosine {base_cos:.3f} at drift 0",
           fill="black", font=font)
    d.text((ml + 160, h - 18), "prior drift (log scale; lower keeps the base model's faces)", fill="black",
           font=font)
    img.save(path)
    return path


def plot(result: dict, path: str, metric: str = "cos") -> str:
    """Identity cosine against finetuning steps, one curve (mean ± std) per start; x axis log(1 + steps)."""
    import math

    w, h, ml, mr, mt, mb = 760, 420, 60, 20, 36, 46
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    curves: dict[str, dict[int, list[float]]] = {}
    for arm, m in result["arms"].items():
        kind, step = arm.split("+")
        curves.setdefault(kind, {})[int(step)] = m[metric]
    refs = {name: stats(result["refs"][name][metric])[0] for name in ("teacher", "base")}
    vals = [v for c in curves.values() for xs in c.values() for v in (stats(xs)[0] - stats(xs)[1],
                                                                      stats(xs)[0] + stats(xs)[1])]
    lo, hi = min(vals + list(refs.values())), max(vals + list(refs.values()))
    pad = 0.05 * (hi - lo or 1)
    lo, hi = lo - pad, hi + pad
    xmax = math.log1p(max(step for c in curves.values() for step in c))

    def xy(step, v):
        return (ml + (w - ml - mr) * math.log1p(step) / xmax, mt + (h - mt - mb) * (hi - v) / (hi - lo))

    log_x_axes(d, font, xy, (0, 10, 40, 100, 400, 1000), xmax, lo, hi, (ml, mt, w - mr, h - mb))
    for name, v in refs.items():
        _, y = xy(0, v)
        d.line([ml, y, w - mr, y], fill=(150, 150, 150), width=1)
        d.text((w - mr - 60, y - 12), name, fill=(120, 120, 120), font=font)
    for i, (name, c) in enumerate(curves.items()):
        col = COLOURS.get(name, (0, 0, 0))
        pts = [(step, *stats(c[step])) for step in sorted(c)]
        for step, m, sd in pts:
            x, y0 = xy(step, m - sd)
            _, y1 = xy(step, m + sd)
            d.line([x, y0, x, y1], fill=col)
        d.line([xy(step, m) for step, m, _ in pts], fill=col, width=2)
        for step, m, _ in pts:
            x, y = xy(step, m)
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=col)
        d.text((ml + 10, mt + 8 + 14 * i), f"start: {name}", fill=col, font=font)
    d.text((ml, 10), f"identity cosine (higher is better) against finetuning steps; mean ± std over "
                     f"{len(result['test'])} test identities", fill="black", font=font)
    d.text((w // 2 - 60, h - 18), "finetuning steps (log scale)", fill="black", font=font)
    img.save(path)
    return path
