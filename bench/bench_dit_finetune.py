"""Per-step time and peak memory of HDB_FastFinetune on a Flux-architecture DiT, against its floor and
against ComfyUI's TrainLoraNode (the DiT twin of bench_finetune.py).

The model is ComfyUI's own Flux class at the "mid" scale of devtools/tiny_dits.py (width 512, 4 double
and 8 single blocks, ~70M parameters) with 256-wide CLIP-L and T5 encoders; fp32 on the CPU, batch 1:

  bare fwd+bwd     one transformer forward + backward to the input, no trainable weights: the floor for
                   any method that backpropagates through the model. ComfyUI's Flux blocks add their
                   residuals in place, so even this floor copies each LayerNorm input (as HDB does).
  HDB (DiT)        HDB_FastFinetune, train_text_encoder off (304 -> here 80 attention projections)
  HDB (DiT+CLIP)   HDB_FastFinetune as by default (also CLIP-L; T5 stays frozen), one draw per step
                   (one forward+backward, as the other rows; the default 4 draws make a step four)
  HDB (DiT, ckpt)  the same with gradient_checkpointing on
  TrainLoraNode    ComfyUI's own trainer at rank 1, fp32, with its gradient checkpointing: in 0.3.75 it
                   runs on ComfyUI's Flux only that way (without, backward fails on the blocks' in-place
                   residual adds) and only on a model built outside inference mode (loaded as the executor
                   loads it, "Inference tensors cannot be saved for backward" at an RMSNorm scale it does
                   not wrap); its row is measured so.

Each measurement runs in its own process (its own peak RSS); methods take turns for `--rounds` rounds.
Step time is the median over the steps after each run's first; ratios come from this run. Then
`--paired` rounds of 3 bare steps and a 3-step HDB run take turns in one process: on a shared machine
this ratio is the steadier one.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_dit_finetune.py            # a few minutes on 1 core
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_dit_finetune.py --scale tiny --steps 4 --rounds 1
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.worker_runs import (add_worker_option, bare_steps, photo_and_prompt, print_rows, rss_mb,  # noqa: E402
                               run_train_lora_node, run_worker, serve_worker, summarise)

METHODS = ("bare", "hdb_dit", "hdb_te", "hdb_ckpt", "trainlora")
LABELS = {"bare": "bare DiT fwd+bwd", "hdb_dit": "HDB_FastFinetune (DiT)",
          "hdb_te": "HDB_FastFinetune (DiT+CLIP-L)", "hdb_ckpt": "HDB_FastFinetune (DiT, ckpt)",
          "trainlora": "TrainLoraNode rank 1 (ckpt)"}


def worker(method: str, scale: str, resolution: int, steps: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from devtools import comfy_runtime, tiny_dits

    rt = comfy_runtime.boot(tempfile.mkdtemp(prefix="hdb_bench_"))
    import comfy.utils

    nodes_pkg = rt["pack"].__name__ + ".nodes."
    autograd, objective = sys.modules[nodes_pkg + "comfy_autograd"], sys.modules[nodes_pkg + "comfy_objective"]
    photo_input = sys.modules[nodes_pkg + "photo_input"]
    # Loaded as the executor loads checkpoints (inference mode), except for TrainLoraNode: in 0.3.75 it fails on
    # such a Flux ("Inference tensors cannot be saved for backward" at an RMSNorm scale it does not wrap).
    with torch.inference_mode(method != "trainlora"):
        model, clip, vae = tiny_dits.comfy_dit_checkpoint("flux1", scale, seed=0)
        g = torch.Generator().manual_seed(0)
        image, latent, cond, pooled = photo_and_prompt(objective, photo_input, model, clip, vae, resolution, g)
    loaded = rss_mb()
    stamps: list[float] = []
    comfy.utils.set_progress_bar_global_hook(lambda *a, **k: stamps.append(time.perf_counter()))

    def bare(n: int) -> None:
        bare_steps(autograd, model, latent, lambda lat: objective.conditioning(
            model.model, cond.clone(), pooled.clone(), lat, resolution, lat.device), n, g, stamps,
            copy_norm_inputs=True)

    def hdb(n: int, te: bool = False, ckpt: bool = False) -> None:
        node = rt["nodes"].NODE_CLASS_MAPPINGS["HDB_FastFinetune"]
        comfy_runtime.call_node(node, model=model, clip=clip, vae=vae, image=image, steps=n,
                                learning_rate=2e-3, relaxed_rank=4, resolution=resolution, seed=0,
                                train_text_encoder=te, gradient_checkpointing=ckpt, draws_per_step=1)

    if method == "paired":
        # Bare and HDB steps taking turns in one process: load from other processes hits both alike.
        per = {"bare": [], "hdb": []}
        for _ in range(steps):
            for name, run in (("bare", bare), ("hdb", hdb)):
                stamps.clear()
                run(3)
                per[name] += [b - a for a, b in zip(stamps, stamps[1:])][-2:]
        return {"paired": per, "peak_mb": rss_mb(), "loaded_mb": loaded,
                "params_m": sum(p.numel() for p in model.model.diffusion_model.parameters()) / 1e6}
    if method == "bare":
        bare(steps)
    elif method in ("hdb_dit", "hdb_te", "hdb_ckpt"):
        hdb(steps, te=method == "hdb_te", ckpt=method == "hdb_ckpt")
    else:
        run_train_lora_node(rt["nodes"], model, latent, cond, pooled, steps, checkpointing=True)
    per_step = [b - a for a, b in zip(stamps, stamps[1:])][-(steps - 1):]
    return {"steps_s": per_step, "peak_mb": rss_mb(), "loaded_mb": loaded,
            "params_m": sum(p.numel() for p in model.model.diffusion_model.parameters()) / 1e6}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", default="mid", choices=["tiny", "mid"])
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--paired", type=int, default=4,
                   help="rounds of bare and HDB steps taking turns in one process (0: skip); the steadier ratio")
    add_worker_option(p)
    args = p.parse_args()
    if serve_worker(args, worker):
        return

    methods = args.methods.split(",")
    print(f"Flux-architecture DiT ({args.scale}), CPU, fp32, {args.threads} thread(s), batch 1, {args.rounds} "
          f"rounds; median s/step over the steps after each run's first; each run in its own process.\n")
    header = f"{'model':<24}{'method':<32}{'s/step':>9}{'x bare':>8}{'x TrainLora':>12}{'peak RSS MB':>13}" \
             f"{'+ over loaded':>15}"
    print(header)
    print("-" * len(header))
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    paired = None
    if args.paired:
        result = run_worker(__file__, "paired", args.scale, args.resolution, args.paired, args.threads)
        paired = result["paired"] if result else None
    for _ in range(args.rounds):
        for method in methods:
            result = run_worker(__file__, method, args.scale, args.resolution, args.steps, args.threads)
            if result is not None:
                runs[method].append(result)
    print_rows(summarise(runs, "params_m"), f"{args.scale} ({{params_m:.1f}}M) {args.resolution}px", LABELS,
               (24, 32))
    if paired:
        b, h = statistics.median(paired["bare"]), statistics.median(paired["hdb"])
        print(f"\nsame process, taking turns ({len(paired['hdb'])} steps each): bare {b:.3f} s/step, "
              f"HDB_FastFinetune (DiT) {h:.3f} s/step: {h / b:.2f}x bare")


if __name__ == "__main__":
    main()
