"""Run under `torch.distributed.run` by tests/test_pipeline_distributed.py (not a test module itself), and
in-process by the same test for the 1-process reference.

`hdb prepare` and stage 0 through the real CLI entry point, then stage 1 through `train_hypernet` with a
step callback that records a hash of this rank's hypernetwork weights.
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


def run(faces: str, base: str, work: str, batch_size: int) -> list[str]:
    """prepare -> stage 0 -> stage 1 into `work`; `batch_size` photos per process (the global batch is 2).

    Stage 0 trains one identity at a time and stage 1 balances its two terms with norms summed over
    processes, so one process and two give the same numbers up to float summation order.
    """
    common = ["--base-model", base, "--resolution", "64", "--face-check", "none", "--min-size", "32",
              "--no-progress", "--cpu"]
    prepared, lidbs = os.path.join(work, "prepared"), os.path.join(work, "lidbs")
    assert cli.main(["prepare", "--data", faces, "--output", prepared, "--shard-size", "2", *common]) == 0
    assert cli.main(["preoptimize", "--data", prepared, "--output", lidbs, "--steps", "2", "--batch-size", "1",
                     *common]) == 0
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    accelerator.wait_for_everyone()
    hashes = []
    settings = HypernetSettings(steps=3, batch_size=batch_size, width=32, heads=2, iterations=1, warmup_steps=1,
                                learning_rate=1e-3, checkpoint_every=2)
    train_hypernet(prepared, lidbs, base, None, os.path.join(work, "hn.safetensors"), settings,
                   accelerator=accelerator, progress=False,
                   on_step=lambda info: hashes.append(weights_hash(info["net"])))
    return hashes


def main():
    faces, base, work = sys.argv[1:4]
    hashes = run(faces, base, work, batch_size=1)
    rank = int(os.environ["RANK"])
    with open(os.path.join(work, f"hashes-{rank}.json"), "w") as f:
        json.dump({"hashes": hashes, "world": int(os.environ["WORLD_SIZE"])}, f)


if __name__ == "__main__":
    main()
