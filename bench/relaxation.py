"""Rank relaxation inside the aux subspace against the paper's free LoRA, on the mid-size model.

The aux subspace of a layer is 100 x 50 of its in x out directions: the whole space of a
64-wide tiny layer, but 12-20 % of the mid model's 256-1024-wide layers (and 0.3-2.5 % of
SD1.5's), so only a wide model can show a difference. On the mid random SD1.5-architecture
model and a real photo (scikit-image's astronaut), both relaxations start from the same
rank-1 LiDB pre-optimised on the photo (standing in for a hypernetwork prediction) and
finetune 40 steps at relaxed rank 4 over a small learning-rate grid; the table gives the
held-out diffusion loss (fixed draws) relative to the start's, lower is better.

This is the denoising loss on the photo, not an identity metric: docs/evidence.md has the
identity measurement. Run:

    .venv/bin/python bench/relaxation.py            # ~10 min on 2 cores
    .venv/bin/python bench/relaxation.py --quick    # ~3 min
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--resolution", type=int, default=128)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from bench.finetune_defaults import photo
    from devtools import comfy_runtime, tiny_models

    rt = comfy_runtime.boot(tempfile.mkdtemp(prefix="hdb_relaxation_"))
    node = rt["nodes"].NODE_CLASS_MAPPINGS["HDB_FastFinetune"]
    training = sys.modules[rt["pack"].__name__ + ".nodes.comfy_training"]
    model, clip, vae = tiny_models.comfy_checkpoint("mid", 0)
    image, res, trigger = photo(args.resolution), args.resolution, "a ohwx face"

    def run(**kw):
        return comfy_runtime.call_node(node, model=model, clip=clip, vae=vae, image=image, trigger=trigger,
                                       resolution=res, mirror=False, **kw)[0]

    def held_out(lidb):
        return training.held_out_loss(model, clip, vae, image, lidb, trigger, res, draws=24)

    t = time.time()
    start = run(steps=40 if args.quick else 100, learning_rate=1e-3, relaxed_rank=1, seed=99)
    start_loss = held_out(start)
    print(f"mid model, {res} px; start (rank 1, pre-optimised): held-out {start_loss:.4f} ({time.time() - t:.0f} s)")
    lrs = [1e-3, 1e-2] if args.quick else [3e-4, 1e-3, 3e-3, 1e-2]
    print("40 steps at relaxed rank 4: held-out loss / start's (lower is better)")
    print("lr \\ relaxation" + "".join(f"{k:>15}" for k in ("aux_subspace", "free_lora")))
    best = {}
    for lr in lrs:
        row = []
        for kind in ("aux_subspace", "free_lora"):
            value = held_out(run(steps=40, learning_rate=lr, relaxed_rank=4, relaxation=kind, init_lidb=start))
            row.append(value / start_loss)
            best[kind] = min(best.get(kind, float("inf")), row[-1])
        print(f"{lr:<15g}" + "".join(f"{v:15.3f}" for v in row), flush=True)
    print("best of the grid: " + ", ".join(f"{k} {v:.3f}" for k, v in best.items())
          + f" ({time.time() - t:.0f} s in all)")


if __name__ == "__main__":
    main()
