"""Run under `accelerate launch` by tests/test_pipeline_distributed.py (not a test module itself).

Stage 0 through the real CLI entry point, then stage 1 through `train_hypernet`
with a step callback that records a hash of this rank's hypernetwork weights.
"""
import hashlib
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

torch.set_num_threads(1)

from hdb_core import cli  # noqa: E402
from hdb_core.training.stage1 import HypernetSettings, train_hypernet  # noqa: E402


def weights_hash(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main():
    faces, base, work = sys.argv[1:4]
    rc = cli.main(["preoptimize", "--data", faces, "--base-model", base, "--output", os.path.join(work, "lidbs"),
                   "--steps", "2", "--batch-size", "2", "--resolution", "64", "--face-check", "none",
                   "--min-size", "32", "--no-progress", "--cpu"])
    assert rc == 0
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    accelerator.wait_for_everyone()
    hashes = []

    def on_step(info):
        hashes.append(weights_hash(info["net"]))

    settings = HypernetSettings(steps=2, batch_size=1, resolution=64, face_check="none", min_size=32,
                                width=32, heads=2, iterations=1, warmup_steps=1, learning_rate=1e-3)
    train_hypernet(faces, os.path.join(work, "lidbs"), base, os.path.join(base, "image_encoder"),
                   os.path.join(work, "hn.safetensors"), settings, accelerator=accelerator, progress=False,
                   on_step=on_step)
    with open(os.path.join(work, f"hashes-{accelerator.process_index}.json"), "w") as f:
        json.dump({"hashes": hashes, "world": accelerator.num_processes}, f)


if __name__ == "__main__":
    main()
