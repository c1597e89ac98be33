"""The experiment behind HDB_FastFinetune's default steps / learning_rate / relaxed_rank.

On a tiny random SD1.5-architecture model and a real photo (scikit-image's
astronaut), it finetunes with several learning rates and ranks and reports the
held-out diffusion loss (fixed noise/timestep draws, so runs are comparable)
relative to the starting point:

  from an init   a rank-1 LiDB pre-optimised on the photo (standing in for a
                 hypernetwork prediction, which no public checkpoint provides),
                 then `--init-steps` of finetuning as in the paper (40);
  from zero      no init, checkpoints at several step counts.

    .venv/bin/python bench/finetune_defaults.py            # ~5-10 min on 2 cores
    .venv/bin/python bench/finetune_defaults.py --quick    # ~1-2 min

Results on random tiny weights only indicate trends; see docs/finetune.md.
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


def photo(size: int) -> torch.Tensor:
    from skimage.data import astronaut

    img = torch.from_numpy(astronaut()).float().div(255)[None]  # [1, 512, 512, 3]
    return torch.nn.functional.interpolate(img.movedim(-1, 1), size=(size, size), mode="area").movedim(1, -1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--init-steps", type=int, default=40)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from devtools import comfy_runtime, tiny_models

    rt = comfy_runtime.boot(tempfile.mkdtemp(prefix="hdb_defaults_"))
    FT = rt["nodes"].NODE_CLASS_MAPPINGS["HDB_FastFinetune"]
    tr = sys.modules[rt["pack"].__name__ + ".nodes.comfy_training"]
    model, clip, vae = tiny_models.comfy_checkpoint("tiny", 0)
    image = photo(args.resolution)
    res, trig = args.resolution, "a ohwx face"

    def run(**kw):
        return comfy_runtime.call_node(FT, model=model, clip=clip, vae=vae, image=image, trigger=trig,
                                       resolution=res, **kw)[0]

    def held_out(lidb):
        return tr.held_out_loss(model, clip, vae, image, lidb, trig, res, draws=24)

    base = held_out(None)
    print(f"held-out loss of the bare model: {base:.4f}")
    lrs = [1e-3, 3e-3, 1e-2] if args.quick else [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
    ranks = [1, 4] if args.quick else [1, 2, 4, 8]

    # A stand-in for a hypernetwork prediction: a rank-1 LiDB pre-optimised on the photo with another seed.
    t = time.time()
    init = run(steps=60 if args.quick else 150, learning_rate=1e-3, relaxed_rank=1, seed=99)
    init_loss = held_out(init)
    print(f"init (rank-1 pre-optimised): held-out {init_loss:.4f} ({time.time() - t:.0f} s)")

    print(f"\nfrom the init, {args.init_steps} steps: held-out loss / init's (lower is better)")
    print("lr \\ rank " + "".join(f"{r:>9}" for r in ranks))
    for lr in lrs:
        row = [held_out(run(steps=args.init_steps, learning_rate=lr, relaxed_rank=r, init_lidb=init)) / init_loss
               for r in ranks]
        print(f"{lr:<10g}" + "".join(f"{v:9.3f}" for v in row), flush=True)

    steps_list = [40, 100] if args.quick else [40, 150, 300]
    print("\nfrom zero: held-out loss / bare model's, by steps (rank 4)")
    print("lr \\ steps " + "".join(f"{s:>9}" for s in steps_list))
    for lr in lrs:
        row = [held_out(run(steps=s, learning_rate=lr, relaxed_rank=4)) / base for s in steps_list]
        print(f"{lr:<10g}" + "".join(f"{v:9.3f}" for v in row), flush=True)


if __name__ == "__main__":
    main()
