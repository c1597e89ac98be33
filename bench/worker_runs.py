"""Running benchmark rows in their own processes and tabulating them (shared by the finetune benches).

Each row runs as `<script> --worker <method> ...` in a fresh process, so its peak RSS is its
own; the worker prints one `RESULT {json}` line with `steps_s`, `peak_mb`, `loaded_mb` and a
parameter count.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_worker(script: str, *args) -> dict | None:
    """The RESULT dict of one worker process; None (and its stderr tail printed) if it failed."""
    cmd = [sys.executable, os.path.abspath(script), "--worker", *map(str, args)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        print(f"{args[0]} failed:\n{out.stderr[-3000:]}")
        return None
    return json.loads(line[len("RESULT "):])


def summarise(runs: dict[str, list[dict]], params_key: str) -> dict[str, dict]:
    """Per method: median step time over all runs, the largest peak and the smallest loaded RSS."""
    return {m: {"step_s": statistics.median([t for r in rs for t in r["steps_s"]]),
                "peak_mb": max(r["peak_mb"] for r in rs), "loaded_mb": min(r["loaded_mb"] for r in rs),
                "params_m": rs[0][params_key]} for m, rs in runs.items() if rs}


def print_rows(rows: dict[str, dict], model: str, labels: dict[str, str], widths: tuple[int, int]) -> None:
    """One line per method: step time, x bare, x TrainLoraNode, peak RSS and its rise over the loaded model."""
    bare, lora = rows.get("bare"), rows.get("trainlora")
    for method, r in rows.items():
        name = model.format(params_m=r["params_m"])
        xb = f"{r['step_s'] / bare['step_s']:.2f}" if bare else "-"
        xl = f"{r['step_s'] / lora['step_s']:.2f}" if lora else "-"
        print(f"{name:<{widths[0]}}{labels[method]:<{widths[1]}}{r['step_s']:9.3f}{xb:>8}{xl:>12}"
              f"{r['peak_mb']:13.0f}{r['peak_mb'] - r['loaded_mb']:15.0f}", flush=True)


def run_train_lora_node(nodes, model, latent, cond, pooled, steps: int, checkpointing: bool) -> None:
    """ComfyUI's own TrainLoraNode at rank 1, fp32, on one latent (the comparison row of both benches)."""
    from devtools import comfy_runtime

    # Two copies of the latent: 0.3.75 crashes on a single latent input (multi_res unset).
    comfy_runtime.call_node(
        nodes.NODE_CLASS_MAPPINGS["TrainLoraNode"], model=[model],
        latents=[{"samples": latent}, {"samples": latent}], positive=[[[cond, {"pooled_output": pooled}]]],
        batch_size=[1], grad_accumulation_steps=[1], steps=[steps], learning_rate=[1e-4], rank=[1],
        optimizer=["AdamW"], loss_function=["MSE"], seed=[0], training_dtype=["fp32"], lora_dtype=["fp32"],
        algorithm=["LoRA"], gradient_checkpointing=[checkpointing], existing_lora=["[None]"])
