"""Per-step time and peak memory of HDB_FastFinetune against its floor and against ComfyUI's TrainLoraNode.

For each model size it measures, on the same latent batch (one photo), conditioning
and resolution, fp32 on the CPU:

  bare fwd+bwd     one UNet forward + backward to the input, no trainable weights:
                   the floor for any method that backpropagates through the UNet
  HDB (UNet)       HDB_FastFinetune with train_text_encoder off
  HDB (UNet+TE)    HDB_FastFinetune as by default (also trains the CLIP text encoder)
  HDB + prior      the same with the prior term on (prior_weight 1: two more passes per draw)

(HDB runs with one draw per step here, one forward+backward like the other rows; the node's
default of 4 draws makes a step four of them at the same memory.)
  TrainLoraNode    ComfyUI's own trainer at rank 1 (fp32, no gradient checkpointing)

Each measurement runs in its own process, so peak RSS is its own (and TrainLoraNode's
weight wrappers cannot leak into the other rows); the methods take turns for
`--rounds` rounds so that load from other processes hits them alike. Step time is the
median over all rounds of the steps after each run's first; ratios come from this run.

    .venv/bin/python bench/bench_finetune.py                 # tiny + mid, a few minutes on 2 cores
    .venv/bin/python bench/bench_finetune.py --scales tiny   # seconds
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.worker_runs import (add_worker_option, bare_steps, photo_and_prompt, print_rows, rss_mb,  # noqa: E402
                               run_train_lora_node, run_worker, serve_worker, summarise)

METHODS = ("bare", "hdb_unet", "hdb_te", "hdb_prior", "trainlora")
LABELS = {"bare": "bare UNet fwd+bwd", "hdb_unet": "HDB_FastFinetune (UNet)",
          "hdb_te": "HDB_FastFinetune (UNet+TE)", "hdb_prior": "HDB_FastFinetune + prior term",
          "trainlora": "TrainLoraNode rank 1"}


def worker(method: str, scale: str, resolution: int, steps: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    torch.set_flush_denormal(os.environ.get("HDB_FLUSH_DENORMAL") == "1")
    from devtools import comfy_runtime, tiny_models

    rt = comfy_runtime.boot(tempfile.mkdtemp(prefix="hdb_bench_"))
    import comfy.utils

    nodes_pkg = rt["pack"].__name__ + ".nodes."
    autograd, objective = sys.modules[nodes_pkg + "comfy_autograd"], sys.modules[nodes_pkg + "comfy_objective"]
    photo_input = sys.modules[nodes_pkg + "photo_input"]
    with torch.inference_mode():   # loaded as the executor loads checkpoints
        model, clip, vae = tiny_models.comfy_checkpoint(scale, seed=0)
        g = torch.Generator().manual_seed(0)
        image, latent, cond, pooled = photo_and_prompt(objective, photo_input, model, clip, vae, resolution, g)
    loaded = rss_mb()
    stamps: list[float] = []
    comfy.utils.set_progress_bar_global_hook(lambda *a, **k: stamps.append(time.perf_counter()))

    if method == "bare":
        bare_steps(autograd, model, latent, lambda lat: {"c_crossattn": cond.clone()}, steps, g, stamps,
                   copy_norm_inputs=False)
    elif method in ("hdb_unet", "hdb_te", "hdb_prior"):
        node = rt["nodes"].NODE_CLASS_MAPPINGS["HDB_FastFinetune"]
        comfy_runtime.call_node(node, model=model, clip=clip, vae=vae, image=image, steps=steps,
                                learning_rate=2e-3, relaxed_rank=4, resolution=resolution, seed=0,
                                train_text_encoder=method != "hdb_unet", draws_per_step=1,
                                prior_weight=1.0 if method == "hdb_prior" else 0.0)
    else:
        run_train_lora_node(rt["nodes"], model, latent, cond, pooled, steps, checkpointing=False)
    per_step = [b - a for a, b in zip(stamps, stamps[1:])][-(steps - 1):]
    return {"steps_s": per_step, "peak_mb": rss_mb(),
            "loaded_mb": loaded,
            "unet_params_m": sum(p.numel() for p in model.model.diffusion_model.parameters()) / 1e6}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scales", default="tiny,mid")
    p.add_argument("--resolution-tiny", type=int, default=128)
    p.add_argument("--resolution-mid", type=int, default=256)
    p.add_argument("--steps-tiny", type=int, default=10)
    p.add_argument("--steps-mid", type=int, default=5)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per process; 1 by default: with 2 on a shared 2-core machine, OpenMP "
                        "barriers made steps up to 200x slower")
    p.add_argument("--rounds", type=int, default=2)
    add_worker_option(p)
    args = p.parse_args()
    if serve_worker(args, worker):
        return

    print(f"CPU, fp32, {args.threads} threads, batch 1, {args.rounds} rounds; median s/step over the steps after "
          f"each run's first; each run in its own process.\n")
    header = f"{'model':<22}{'method':<30}{'s/step':>9}{'x bare':>8}{'x TrainLora':>12}{'peak RSS MB':>13}" \
             f"{'+ over loaded':>15}"
    print(header)
    print("-" * len(header))
    for scale in args.scales.split(","):
        res = getattr(args, f"resolution_{scale}")
        steps = getattr(args, f"steps_{scale}")
        runs: dict[str, list[dict]] = {m: [] for m in METHODS}
        for _ in range(args.rounds):
            for method in METHODS:
                result = run_worker(__file__, method, scale, res, steps, args.threads)
                if result is not None:
                    runs[method].append(result)
        print_rows(summarise(runs, "unet_params_m"), f"{scale} ({{params_m:.1f}}M) {res}px", LABELS, (22, 30))

if __name__ == "__main__":
    main()
