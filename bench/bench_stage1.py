"""Stage-1 costs in one run: step time with cached features, with the image encoder recomputed, and a bare
UNet forward+backward at the same batch; peak RSS with 100 vs 1,000 identities; `hdb prepare` throughput.

    python bench/bench_stage1.py [--scales tiny mid] [--batch 4] [--steps 8] [--threads 1] [--sd15-latent 32]

* cached: one training step as `train_hypernet` runs it (features read from the prepared shards,
  hypernetwork forward, UNet + text encoder with the predicted LiDBs, balanced backward, AdamW).
* recomputed: the same step with the batch's features computed by the image encoder, as stage 1
  did before `hdb prepare` (the encoder ran on every photo of every step).
* bare: the UNet alone, forward and backward (to its input), same batch, latents and timesteps.
* cached and recomputed run with the prior term off, to measure what the hypernetwork adds; "+ prior"
  is the cached step with stage 1's default prior term (`defaults.STAGE_PRIOR_WEIGHT`), what `hdb
  train-hypernet` runs by default, as a ratio to the cached step.
* sd15 (with --sd15-latent): the real shapes with random weights, an in-memory batch (no shard reads).
* RSS: `train_hypernet` in a fresh process on N prepared tiny identities (every identity visited at
  least once at N=1000), peak resident memory of that process.

The tiny/mid models are random-weight stand-ins built by devtools/tiny_diffusers.py; their image
encoders are far smaller relative to the UNet than ViT-H is to SD1.5, so the "recomputed" ratio
understates what caching saves at real scale.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

RESOLUTION = {"tiny": 64, "mid": 128}
WIDTH = {"tiny": 64, "mid": 256}


def setup(work: str, scale: str, identities: int, use: str):
    """(model folder, prepared folder, LiDB folder, prepare summary) for `identities` synthetic faces; `use`
    names the prepared folder, so each measurement prepares (and times) its own."""
    from devtools import tiny_diffusers
    from tests.pipeline_fixtures import make_faces

    from hdb_core.training.prepared import PrepareSettings, prepare
    from hdb_core.training.stage0 import PreoptimizeSettings, preoptimize

    model = os.path.join(work, f"model-{scale}")
    if not os.path.isdir(model):
        tiny_diffusers.save(model, scale, seed=0)
    faces = make_faces(os.path.join(work, f"faces-{scale}-{identities}"), identities,
                       size=(2 * RESOLUTION[scale], 2 * RESOLUTION[scale]))
    prepared = os.path.join(work, f"prepared-{use}-{scale}-{identities}")
    summary = prepare(faces, model, os.path.join(model, "image_encoder"), prepared,
                      PrepareSettings(resolution=RESOLUTION[scale], face_check="none", min_size=32, batch_size=16),
                      progress=False)
    lidbs = os.path.join(work, f"lidbs-{scale}-{identities}")
    one = os.path.join(work, f"one-{scale}")
    if not os.path.isdir(one):
        preoptimize(faces, model, one, PreoptimizeSettings(steps=1, resolution=RESOLUTION[scale], face_check="none",
                                                           min_size=32), progress=False)
    os.makedirs(lidbs, exist_ok=True)
    source = os.path.join(one, sorted(n for n in os.listdir(one) if n.endswith(".safetensors"))[0])
    for k in range(identities):           # the same target for everyone: memory, not quality, is measured
        shutil.copy(source, os.path.join(lidbs, f"id{k:02d}.safetensors"))
    return model, prepared, lidbs, summary


def median_seconds(fn, steps: int) -> float:
    fn()                                  # warm-up
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def hypernet_seconds(net, features: torch.Tensor, steps: int) -> float:
    """The hypernetwork alone, forward and backward, on one batch of features: the part of a stage-1
    step that a bare UNet step does not have, and that weighs as much as a small UNet."""
    def step():
        a, b = net(features)
        sum(v.pow(2).sum() for v in [*a.values(), *b.values()]).backward()

    seconds = median_seconds(step, steps)
    net.zero_grad(set_to_none=True)
    return seconds


def step_costs(work: str, scale: str, batch: int, steps: int) -> dict:
    from hdb_core.hypernet.image_encoder import ClipImageEncoder
    from hdb_core.training.base_model import load_base_model, tokenize
    from hdb_core.training.data import prepare_image
    from hdb_core.training.prepared import PreparedData
    from hdb_core.training.stage1 import HypernetSettings, Objective, Samples, check_targets, new_hypernet

    model, prepared_dir, lidbs, prep = setup(work, scale, 8, "step")
    base = load_base_model(model).to("cpu")
    encoder = ClipImageEncoder.from_pretrained(os.path.join(model, "image_encoder"))
    prepared = PreparedData(prepared_dir)
    settings = HypernetSettings(batch_size=batch, steps=10 ** 6, width=WIDTH[scale], heads=4, depth=2,
                                iterations=4, resolution=RESOLUTION[scale], face_check="none", prior_weight=0.0)
    layers, config, mean, _ = check_targets(prepared.ids, lidbs, base)
    net = new_hypernet(settings, layers, config, prepared.encoder, base.name, mean)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    side = RESOLUTION[scale] // 8
    samples = Samples(prepared, prepared.ids, lidbs, settings, 1, base.num_timesteps, (4, side, side))
    faces = os.path.join(work, f"faces-{scale}-8")
    photos = {ident: prepare_image(os.path.join(faces, f"{ident}.png"), RESOLUTION[scale], "none")
              for ident in prepared.ids}
    counter = iter(range(10 ** 6))

    def train_step(recompute: bool, objective):
        step = next(counter)
        batch = samples.batch(step)
        if recompute:                     # what stage 1 did before: the encoder on every photo of the step
            idents = [samples.identity(p) for p in samples.positions(step)]
            batch["features"] = encoder.encode(torch.stack([photos[i] for i in idents]))
        terms = objective.terms(net, batch)
        optimizer.zero_grad(set_to_none=True)
        objective.backward(terms)
        optimizer.step()

    fixed = samples.batch(0)
    ids = tokenize(base, [settings.trigger] * batch, "cpu")

    def bare_step():
        latents = fixed["latents"].clone()
        noisy = base.noise_scheduler.add_noise(latents, fixed["noise"], fixed["timestep"]).requires_grad_(True)
        with torch.no_grad():
            ctx = base.text_encoder(ids)[0]
        out = base.unet(noisy, fixed["timestep"], ctx).sample
        (out - fixed["noise"]).pow(2).mean().backward()

    bare = median_seconds(bare_step, steps)
    with Objective(layers, config, base, settings, "cpu", torch.float32) as objective:
        cached = median_seconds(lambda: train_step(False, objective), steps)
        recomputed = median_seconds(lambda: train_step(True, objective), steps)
    with Objective(layers, config, base, with_default_prior(settings), "cpu", torch.float32) as objective:
        prior = median_seconds(lambda: train_step(False, objective), steps)
    unet_params = sum(p.numel() for p in base.unet.parameters()) / 1e6
    return {"scale": scale, "unet_m": unet_params, "hypernet_m": net.num_parameters / 1e6, "bare": bare,
            "cached": cached, "recomputed": recomputed, "prior": prior,
            "prepare_photos_per_s": prep["photos_per_second"],
            "hypernet": hypernet_seconds(net, fixed["features"], steps)}


def with_default_prior(settings):
    """`settings` with stage 1's default prior term, as `hdb train-hypernet` runs."""
    from hdb_core import defaults

    return replace(settings, prior_weight=defaults.STAGE_PRIOR_WEIGHT)


def sd15_costs(work: str, batch: int, steps: int, latent: int) -> dict:
    """bare vs cached vs recomputed at the real SD1.5 / CLIP-L / ViT-H-14 / default-hypernetwork shapes.

    Random weights, features and targets (cost does not depend on them); a `latent`-sized latent.
    """
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPVisionConfig, CLIPVisionModel

    from devtools import tiny_diffusers
    from hdb_core.hypernet.image_encoder import VIT_H_14, ClipImageEncoder
    from hdb_core.hypernet.model import HyperNetConfig, HyperNetwork
    from hdb_core.lidb.batch import stack_train
    from hdb_core.lidb.weights import LiDB, LiDBConfig
    from hdb_core.training.base_model import BaseModel, tokenize
    from hdb_core.training.stage1 import HypernetSettings, Objective

    model = os.path.join(work, "model-tiny")
    if not os.path.isdir(model):
        tiny_diffusers.save(model, "tiny", seed=0)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8).requires_grad_(False)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                      num_hidden_layers=12, projection_dim=768)).requires_grad_(False)
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(model, "tokenizer"))   # the real SD1 vocabulary
    base = BaseModel(unet, None, te, tokenizer, DDPMScheduler(beta_schedule="scaled_linear"), "sd15-shapes")
    vit_h = ClipImageEncoder(CLIPVisionModel(CLIPVisionConfig(hidden_size=1280, intermediate_size=5120,
                                                              num_attention_heads=16, num_hidden_layers=32,
                                                              image_size=224, patch_size=14)), VIT_H_14)
    layers, config = base.layers(), LiDBConfig()
    settings = HypernetSettings(batch_size=batch, prior_weight=0.0)
    net = HyperNetwork(HyperNetConfig(), layers, config, VIT_H_14)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    a, b = stack_train([LiDB.zeros(layers, config)] * batch)
    images = torch.rand(batch, 512, 512, 3)
    data = {"features": torch.randn(batch, VIT_H_14.num_tokens, VIT_H_14.hidden_size),
            "latents": torch.randn(batch, 4, latent, latent), "noise": torch.randn(batch, 4, latent, latent),
            "timestep": torch.randint(1000, (batch,)), "a": a, "b": b}
    objective = Objective(layers, config, base, settings, "cpu", torch.float32)
    ids = tokenize(base, [settings.trigger] * batch, "cpu")

    def bare_step():
        noisy = base.noise_scheduler.add_noise(data["latents"], data["noise"], data["timestep"]).requires_grad_(True)
        with torch.no_grad():
            ctx = te(ids)[0]
        (unet(noisy, data["timestep"], ctx).sample - data["noise"]).pow(2).mean().backward()

    def train_step(recompute: bool, objective):
        batch_ = dict(data, features=vit_h.encode(images)) if recompute else data
        terms = objective.terms(net, batch_)
        optimizer.zero_grad(set_to_none=True)
        objective.backward(terms)
        optimizer.step()

    bare = median_seconds(bare_step, steps)
    with objective:
        cached = median_seconds(lambda: train_step(False, objective), steps)
        recomputed = median_seconds(lambda: train_step(True, objective), steps)
    with Objective(layers, config, base, with_default_prior(settings), "cpu", torch.float32) as objective:
        prior = median_seconds(lambda: train_step(False, objective), steps)
    return {"scale": f"sd15@{latent}", "unet_m": sum(p.numel() for p in unet.parameters()) / 1e6,
            "hypernet_m": net.num_parameters / 1e6, "bare": bare, "cached": cached, "recomputed": recomputed,
            "prior": prior,
            "prepare_photos_per_s": float("nan"), "hypernet": hypernet_seconds(net, data["features"], steps)}


def rss_child(prepared: str, lidbs: str, model: str, steps: int, batch: int, out: str) -> None:
    """Runs in a fresh process: stage 1 on a prepared folder, then prints this process's peak RSS."""
    from accelerate import Accelerator

    from hdb_core.training.stage1 import HypernetSettings, train_hypernet

    settings = HypernetSettings(steps=steps, batch_size=batch, width=64, heads=4, depth=2, iterations=4,
                                checkpoint_every=steps, val_identities=8, warmup_steps=1)
    train_hypernet(prepared, lidbs, model, None, out, settings, accelerator=Accelerator(cpu=True), progress=False)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork+exec.
    with open("/proc/self/status") as f:
        peak_kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"maxrss_mb": peak_kb / 1024}))


def peak_rss(work: str, counts: list[int], batch: int) -> dict:
    results = {}
    steps = max(counts) // batch + 1      # every identity of the largest set is visited
    for n in counts:
        model, prepared, lidbs, prep = setup(work, "tiny", n, "rss")
        out = os.path.join(work, f"hn-{n}.safetensors")
        env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": str(torch.get_num_threads())}
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--rss-child", prepared, lidbs, model,
                               str(steps), str(batch), out], capture_output=True, text=True, env=env)
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        results[n] = (json.loads(proc.stdout.strip().splitlines()[-1])["maxrss_mb"], prep["photos_per_second"])
    return {"steps": steps, "by_count": results}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scales", nargs="*", default=["tiny", "mid"], choices=sorted(RESOLUTION))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant (median)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rss-identities", type=int, nargs=2, default=[100, 1000])
    parser.add_argument("--sd15-batch", type=int, default=1)
    parser.add_argument("--sd15-latent", type=int, default=0,
                        help="also time the real SD1.5/CLIP-L/ViT-H/hypernetwork shapes at this latent size "
                             "(random weights; 64 = 512 px)")
    parser.add_argument("--rss-child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.rss_child:
        prepared, lidbs, model, steps, batch, out = args.rss_child
        rss_child(prepared, lidbs, model, int(steps), int(batch), out)
        return
    import logging

    logging.disable(logging.WARNING)
    work = tempfile.mkdtemp(prefix="bench_stage1_")
    try:
        rss = peak_rss(work, args.rss_identities, args.batch)      # first, while this process is small
        print(f"stage-1 step, batch {args.batch} (sd15: {args.sd15_batch}), median of {args.steps} steps, fp32, CPU, "
              f"{args.threads} threads")
        print(f"{'scale':>8} | {'UNet M':>6} | {'hypernet M':>10} | {'bare s':>7} | {'cached s':>8} | "
              f"{'recomputed s':>12} | {'cached/bare':>11} | {'recomputed/cached':>17} | {'prepare photos/s':>16} | "
              f"{'hypernet alone/bare':>19} | {'+ prior/cached':>14}")
        runs = [lambda scale=scale: step_costs(work, scale, args.batch, args.steps) for scale in args.scales]
        if args.sd15_latent:
            runs.append(lambda: sd15_costs(work, args.sd15_batch, args.steps, args.sd15_latent))
        for run in runs:
            r = run()
            print(f"{r['scale']:>8} | {r['unet_m']:6.1f} | {r['hypernet_m']:10.2f} | {r['bare']:7.4f} | "
                  f"{r['cached']:8.4f} | {r['recomputed']:12.4f} | {r['cached'] / r['bare']:10.2f}x | "
                  f"{r['recomputed'] / r['cached']:16.2f}x | {r['prepare_photos_per_s']:16.1f} | "
                  f"{r['hypernet'] / r['bare']:18.2f}x | {r['prior'] / r['cached']:13.2f}x")
        (small, small_rate), (large, large_rate) = (rss["by_count"][n] for n in args.rss_identities)
        print(f"\nstage-1 peak RSS, tiny model, {rss['steps']} steps x batch {args.batch} (fresh process each):")
        for n in args.rss_identities:
            print(f"  {n:>5} identities: {rss['by_count'][n][0]:8.1f} MB   (prepare: {rss['by_count'][n][1]:.1f} "
                  f"photos/s incl. mirror encodes)")
        print(f"  {args.rss_identities[1]} vs {args.rss_identities[0]}: {large / small:.3f}x "
              f"({100 * (large - small) / small:+.1f} %)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
