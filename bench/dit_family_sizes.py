"""Full-size target counts and rank-1 LiDB file sizes per model family (meta-device models, no weights).

The transformer of each family is built on the meta device with ComfyUI's own classes at its real
shapes (devtools/tiny_dits.py, scale "full"); its targets come from the same discovery the nodes
use (nodes/comfy_targets.py). CLIP-family text encoders add their self-attention projections
(CLIP-L: 12 layers x 4, width 768; OpenCLIP-bigG: 32 layers x 4, width 1280); T5 and LLM encoders
are never targets. The file is a real rank-1 LiDB written with `save_lidb` (its aux bases are
generated, so the first run takes a while per family).

    .venv/bin/python bench/dit_family_sizes.py
"""
from __future__ import annotations

import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# family -> (label, CLIP-family text encoders that are targets: (component, layers, width))
FAMILIES = {
    "flux1": ("Flux.1 dev/schnell", [("te", 12, 768)]),
    "sd35": ("SD3.5 Large", [("te1", 12, 768), ("te2", 32, 1280)]),
    "flux2": ("Flux.2 Klein 4B", []),
    "zimage": ("Z-Image", []),
    "qwenimage": ("Qwen-Image", []),
}


def clip_specs(component: str, layers: int, width: int):
    from hdb_core.lidb.targets import LayerSpec

    return [LayerSpec(f"{component}.text_model.encoder.layers.{i}.self_attn.{p}", width, width)
            for i in range(layers) for p in ("q_proj", "k_proj", "v_proj", "out_proj")]


def main() -> None:
    import torch

    torch.set_num_threads(1)
    from devtools import comfy_runtime, tiny_dits

    rt = comfy_runtime.boot(tempfile.mkdtemp(prefix="hdb_sizes_"))
    ct = sys.modules[rt["pack"].__name__ + ".nodes.comfy_targets"]
    import hdb_core

    print(f"{'family':<22}{'transformer':>12}{'fused slices':>14}{'text enc.':>11}{'layers':>8}"
          f"{'rank-1 LiDB':>13}{'build s':>9}")
    for family, (label, encoders) in FAMILIES.items():
        t0 = time.perf_counter()
        model = tiny_dits.comfy_dit_checkpoint(family, "full", device="meta")[0]
        targets = ct.model_targets(model)
        specs = [t.spec for t in targets.values()]
        te = [s for enc in encoders for s in clip_specs(*enc)]
        lidb = hdb_core.LiDB.zeros(specs + te, hdb_core.LiDBConfig(rank=1), family=ct.model_family(model))
        with tempfile.TemporaryDirectory() as d:
            size = os.path.getsize(hdb_core.save_lidb(lidb, os.path.join(d, "id.safetensors")))
        slices = sum(1 for t in targets.values() if t.rows is not None)
        print(f"{label:<22}{len(specs):>12}{slices:>14}{len(te):>11}{len(specs) + len(te):>8}"
              f"{size / 1024:>10.0f} KB{time.perf_counter() - t0:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
