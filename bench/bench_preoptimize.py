"""Stage-0 throughput: identities per hour at batch 1 vs batch 8, same device and model, one run.

Each sample of a batch is a different identity with its own LiDB (batched
per-sample residuals), so a batch of 8 trains 8 identities in one
forward/backward. This measures the whole `preoptimize` call (image loading,
VAE encoding, training, saving) for the same identities at both batch sizes.

    python bench/bench_preoptimize.py [--scale mid] [--resolution 128] [--steps 6] [--identities 8]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from hdb_core import defaults  # noqa: E402


def synthetic_faces(root: str, n: int, size: int) -> str:
    from PIL import Image, ImageDraw

    os.makedirs(root, exist_ok=True)
    for k in range(n):
        im = Image.new("RGB", (size, size), ((53 * k) % 256, (97 * k) % 256, (151 * k + 90) % 256))
        ImageDraw.Draw(im).ellipse((size // 6, size // 8, size - size // 6 - k, size - size // 8),
                                   fill=((200 + 17 * k) % 256, (60 * k) % 256, 30))
        im.save(os.path.join(root, f"id{k:03d}.png"))
    return root


def sd15_step_cost(batches: list[int], device: str, prior_weight: float, steps: int = 2) -> None:
    """Seconds per stage-0 training step at the real SD1.5 shapes (random weights, 64x64 latent, no VAE)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from hdb_core.training.base_model import BaseModel
    from hdb_core.lidb.batch import LayerFactors
    from hdb_core.lidb.weights import LiDBConfig
    from hdb_core.training.objective import PriorTerm
    from hdb_core.training.stage0 import diffusion_loss, init_chunk

    unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8).to(device).requires_grad_(False)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                      num_hidden_layers=12, projection_dim=768)).to(device).requires_grad_(False)
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    base = BaseModel(unet, None, te, None, sched, "sd15-shapes")
    layers, config = base.layers(), LiDBConfig()
    print(f"\nstage-0 step at SD1.5 shapes ({sum(p.numel() for p in unet.parameters()) / 1e6:.0f}M UNet params, "
          f"{len(layers)} LiDB layers), 64x64 latent, fp32, prior weight {prior_weight:g}, device {device}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'batch':>5} | {'s/step':>7} | {'s/identity-step':>15}")
    factors = LayerFactors(config, layers, device)
    with base.injector(layers) as inj:
        for bs in batches:
            a, b = init_chunk([str(i) for i in range(bs)], layers, config, 0)
            params = [t.to(device).requires_grad_(True) for t in (*a.values(), *b.values())]
            a, b = dict(zip(a, params[:len(a)])), dict(zip(b, params[len(a):]))
            opt = torch.optim.Adam(params, lr=1e-3)
            ids = torch.zeros(bs, 77, dtype=torch.long, device=device)
            prior = PriorTerm(base, inj, ids[:1], per_sample=True) if prior_weight else None
            times = []
            for k in range(steps + 1):
                lat = torch.randn(bs, 4, 64, 64, device=device)
                t0 = time.perf_counter()
                loss = diffusion_loss(base, inj, factors.named(a, b), ids, lat, torch.randn_like(lat),
                                      torch.randint(1000, (bs,), device=device), torch.float32, True, prior,
                                      prior_weight)
                opt.zero_grad()
                loss.sum().backward()
                opt.step()
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                if k:
                    times.append(time.perf_counter() - t0)
            best = min(times)
            print(f"{bs:>5} | {best:7.2f} | {best / bs:15.2f}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", choices=("tiny", "mid"), default="mid", help="devtools.tiny_diffusers model size")
    p.add_argument("--base-model", default=None, help="a real diffusers folder instead of a random --scale model")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--steps", type=int, default=6, help="training steps per identity in the measurement")
    p.add_argument("--identities", type=int, default=8)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--prior-weight", type=float, default=defaults.STAGE_PRIOR_WEIGHT,
                   help="stage 0's prior term (default: `hdb preoptimize`'s; 0: off, as before it became the default)")
    p.add_argument("--sd15-step", action="store_true",
                   help="instead: seconds per training step at the real SD1.5 shapes (random weights)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.sd15_step:
        return sd15_step_cost(args.batch, args.device, args.prior_weight)

    from hdb_core.training.base_model import BaseModel, load_base_model
    from hdb_core.training.runtime import ProcessInfo
    from hdb_core.training.stage0 import PreoptimizeSettings, preoptimize

    if args.base_model:
        base = load_base_model(args.base_model)
        name = args.base_model
    else:
        from devtools.tiny_diffusers import build

        unet, vae, te, tok, sched, _ = build(args.scale, seed=0)
        base, name = (BaseModel(unet, vae, te, tok, sched, f"random-{args.scale}"),
                      f"random '{args.scale}' SD-architecture")
    n_params = sum(p.numel() for p in base.unet.parameters())
    work = tempfile.mkdtemp(prefix="hdb_bench_")
    try:
        faces = synthetic_faces(os.path.join(work, "faces"), args.identities, args.resolution)
        process = ProcessInfo(0, 1, torch.device(args.device))
        # Warm-up (allocator, kernels, aux-basis cache) outside the measurement.
        preoptimize(faces, base, os.path.join(work, "warm"), PreoptimizeSettings(
            steps=1, batch_size=max(args.batch), resolution=args.resolution, face_check="none", min_size=16,
            dtype=args.dtype, prior_weight=args.prior_weight), process=process, progress=False)
        results = []
        for bs in args.batch:
            out = os.path.join(work, f"b{bs}")
            s = PreoptimizeSettings(steps=args.steps, batch_size=bs, resolution=args.resolution, face_check="none",
                                    min_size=16, checkpoint_every=10 ** 9, dtype=args.dtype,
                                    prior_weight=args.prior_weight)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            preoptimize(faces, base, out, s, process=process, progress=False)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
            results.append((bs, wall, args.identities / wall * 3600))
        print(f"\nstage-0 throughput: {name} UNet ({n_params / 1e6:.1f}M params), {args.resolution}px, "
              f"{args.steps} steps/identity, {args.identities} identities, prior weight {args.prior_weight:g}, "
              f"device {args.device}, "
              f"{torch.get_num_threads()} CPU threads")
        print(f"{'batch':>5} | {'wall s':>8} | {'s/step':>7} | {'identities/hour':>15} | "
              f"{'vs batch ' + str(results[0][0]):>10}")
        for bs, wall, iph in results:
            steps_run = args.steps * -(-args.identities // bs)
            print(f"{bs:>5} | {wall:8.2f} | {wall / steps_run:7.3f} | {iph:15.1f} | {iph / results[0][2]:9.2f}x")
        print(f"(identities/hour at the paper's 300 steps: divide by {300 / args.steps:.0f})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
