"""What building a LiDB's LoRA factors costs per draw at full size: aten ops dispatched and CPU time.

Fast Finetune rebuilds every target layer's factors (down, up) from the aux bases and the train
matrices for each draw and backpropagates through them: on the CPU one layer and rank component
at a time (so relaxing a LiDB leaves its dW bit for bit), elsewhere with one batched matmul per
group of same-shaped layers (`grouped_down_up`). Both builds are counted here. On a GPU each op
is a kernel launch and some microseconds of CPU, so the op count is the number that carries over
from this machine; the CPU time here also holds the small matmuls' arithmetic. For scale, it
counts the ops of the bare UNet's forward and backward too (diffusers' UNet of the same
architecture on the meta device: ops dispatched, nothing computed). Full-size layer lists come
from devtools.arch_targets (meta device, no weights).

    .venv/bin/python bench/factor_cost.py            # SD1.5 and SDXL at relaxed rank 4 (the default)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--rank", type=int, default=None, help="relaxed rank (default: the node's)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)

    import torch

    from devtools import arch_targets
    from devtools.op_count import OpCount
    from hdb_core import defaults
    from hdb_core.lidb.weights import LiDB, LiDBConfig
    from hdb_core.training.finetune import TrainableLiDB

    rank = args.rank or defaults.RELAXED_RANK
    torch.set_num_threads(1)
    print(f"factors of every target layer, forward and backward, relaxed rank {rank}, 1 CPU thread")
    print("| arch | layers | build | factor ops per draw | CPU s per draw (median) | bare UNet fwd+bwd ops |")
    print("|---|---|---|---|---|---|")
    for arch, targets, unet in (("sd15", arch_targets.sd15_targets, arch_targets.sd15_unet),
                                ("sdxl", arch_targets.sdxl_targets, arch_targets.sdxl_unet)):
        with OpCount() as bare:
            unet_forward_backward(unet())
        layers = targets()
        start = LiDB.trainable_start(layers, LiDBConfig(rank=rank), torch.Generator().manual_seed(0))
        for grouped in (False, True):
            weights = TrainableLiDB(start, torch.device("cpu"), grouped=grouped)

            # a gradient for every factor, made beforehand: only the build and its backward are counted
            grads = [torch.ones_like(t) for pair in weights.factors().values() for t in pair]

            def draw(weights=weights, grads=grads):
                factors = weights.factors()
                torch.autograd.backward([t for pair in factors.values() for t in pair], grads)

            draw()  # first use builds and caches the aux bases
            with OpCount() as count:
                draw()
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                draw()
                times.append(time.perf_counter() - t0)
            build = f"grouped ({len(weights.build.groups)} shape groups)" if grouped else "per layer"
            print(f"| {arch} | {len(layers)} | {build} | {count.ops:,} | {statistics.median(times):.3f} | "
                  f"{bare.ops:,} |")
    return 0


def unet_forward_backward(unet) -> None:
    """One forward and backward to the input (frozen weights, as in a finetune) of a meta-device
    diffusers UNet at its native latent size."""
    import torch

    unet.requires_grad_(False)
    cfg = unet.config
    size = cfg.sample_size
    x = torch.zeros(1, cfg.in_channels, size, size, device="meta", requires_grad=True)
    text = torch.zeros(1, 77, cfg.cross_attention_dim, device="meta")
    extra = {}
    if cfg.addition_embed_type == "text_time":   # SDXL: pooled text and the size/crop conditioning
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        extra = {"added_cond_kwargs": {"text_embeds": torch.zeros(1, pooled, device="meta"),
                                       "time_ids": torch.zeros(1, 6, device="meta")}}
    out = unet(x, torch.tensor([500], device="meta"), text, **extra).sample
    out.float().pow(2).mean().backward()


if __name__ == "__main__":
    sys.exit(main())
