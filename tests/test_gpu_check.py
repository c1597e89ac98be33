"""bench/gpu_check.py's code paths, on tiny models on the CPU (the GPU run uses the same ones)."""
from __future__ import annotations

import os
import subprocess
import sys

from devtools.comfy_runtime import REPO


def test_gpu_check_tiny_runs_every_row(tmp_path):
    out = tmp_path / "gpu_check.md"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "bench", "gpu_check.py"), "--tiny", "--steps", "2",
                           "--out", str(out)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = out.read_text()
    rows = [line for line in report.splitlines() if line.startswith("| sd")]
    assert len(rows) == 8, report                       # 2 archs x (2 finetunes, bare, TrainLoraNode)
    assert not [r for r in rows if "failed" in r], report
    assert "sdxl: aux-basis build" in report and "hypernetwork prediction" in report


def test_the_step_clock_counts_only_the_training_bar(comfy):
    """The aux-basis build's progress (first use of an architecture) must not pass for training steps."""
    import importlib.util

    import comfy.utils
    import torch

    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(REPO, "bench", "gpu_check.py"))
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    clock = gpu_check.StepClock(torch.device("cpu"), steps=3)
    try:
        build = comfy.utils.ProgressBar(40)
        for i in range(40):
            build.update_absolute(i + 1)
        steps = comfy.utils.ProgressBar(3)
        for i in range(3):
            steps.update_absolute(i + 1)
    finally:
        clock.close()
    assert len(clock.stamps) == 3
