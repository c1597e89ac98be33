"""How long HDB_PredictLiDBWeights' hypernetwork takes on the CPU, and how big the default network is.

Builds the full SD1.5 target list (176 layers: diffusers UNet2DConditionModel
SD1.5 config + CLIP-L text encoder, on the meta device), a default-config
HyperNetwork with random weights, and ViT-H-shaped features ([N, 257, 1280]).
The image encoder is excluded (it is the user's CLIP_VISION model). Reports the
parameter count, the size of the saved .safetensors file, and the median
prediction time for 1 and 4 photos, for SD1.5 (goal: under 1 s) and SDXL; the same
for the subspace hypernetwork (`hdb train-hypernet --subspace-components 128`).

    .venv/bin/python bench/bench_predict.py [--threads 1,2] [--repeats 5] [--no-sdxl]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

GOAL_S = 1.0


def median_time(fn, repeats: int) -> tuple[float, float]:
    """(median wall seconds, median process CPU seconds) per call.

    On a shared machine wall time includes waiting for a core; CPU time does not,
    so a large gap between them means the run was waiting for busy cores.
    """
    fn()  # warm-up (allocations, kernel selection)
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def measure(arch: str, layers, repeats: int, threads: list[int], components: int) -> None:
    from hdb_core.hypernet.model import HyperNetConfig, HyperNetwork
    from hdb_core.hypernet.subspace_model import SubspaceHyperNetwork, SubspaceNetConfig
    from hdb_core.hypernet.image_encoder import VIT_H_14
    from hdb_core.lidb.weights import LiDBConfig

    torch.manual_seed(0)
    config = HyperNetConfig()
    net = HyperNetwork(config, layers, LiDBConfig(), VIT_H_14).eval()
    heads = sum(p.numel() for p in net.heads.parameters())
    print(f"{arch}: {len(layers)} layers, config {config.to_dict()}")
    report(net, arch, f"({heads:,} in the per-layer heads)", repeats, threads)
    sub = SubspaceHyperNetwork(SubspaceNetConfig(components), layers, LiDBConfig(), VIT_H_14).eval()
    with torch.no_grad():
        sub.subspace_directions.normal_()
        sub.coordinates.weight.normal_(0, 1e-3)
    print(f"{arch}, subspace hypernetwork: {components} directions of {sub.subspace_mean.numel():,} numbers")
    report(sub, arch, f"(the map from {sub.feature_mean.numel():,} features)", repeats, threads)


def report(net, arch: str, detail: str, repeats: int, threads: list[int]) -> None:
    from hdb_core.hypernet.file import save_hypernet
    from hdb_core.hypernet.image_encoder import VIT_H_14

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "hypernet.safetensors")
        save_hypernet(net, path, {"base_model": arch})
        size = os.path.getsize(path)
    print(f"  parameters {net.num_parameters:,} {detail}, file {size / 2**20:.1f} MiB ({size:,} bytes, float32)")
    for th in threads:
        torch.set_num_threads(th)
        for n in (1, 4):
            feats = torch.randn(n, VIT_H_14.num_tokens, VIT_H_14.hidden_size)
            t, cpu = median_time(lambda feats=feats: net.predict_lidb(feats), repeats)
            print(f"  {th} thread{'s' if th > 1 else ''}, {n} photo{'s' if n > 1 else ''}: wall {t * 1000:.0f} ms "
                  f"median of {repeats} ({t / GOAL_S:.2f}x the {GOAL_S:.0f} s goal), CPU time {cpu * 1000:.0f} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default="1,2", help="comma-separated torch CPU thread counts to time (default 1,2)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-sdxl", action="store_true", help="skip the SDXL target list")
    p.add_argument("--subspace-components", type=int, default=128, help="directions of the subspace hypernetwork")
    args = p.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    from devtools.arch_targets import sd15_targets, sdxl_targets

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, load average {load:.1f} at start "
          f"(other processes slow multi-threaded runs most), encoder excluded")
    measure("SD1.5", sd15_targets(), args.repeats, threads, args.subspace_components)
    if not args.no_sdxl:
        measure("SDXL", sdxl_targets(), args.repeats, threads, args.subspace_components)


if __name__ == "__main__":
    main()
