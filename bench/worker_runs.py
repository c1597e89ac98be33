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
import time

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


def rss_mb() -> float:
    """This process's peak resident memory in MB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def photo_and_prompt(objective, photo_input, model, clip, vae, resolution: int, g):
    """(image, its latent, cond, pooled): a random photo encoded as the finetune node encodes it, and the
    trigger prompt. `objective`, `photo_input`: the pack's modules of those names."""
    import torch

    image = torch.rand(1, resolution, resolution, 3, generator=g)
    latent = objective.encode_photo_latents(vae, model.model, photo_input.prepare_pixels(image, resolution),
                                            mirror=False)[:, 0]
    cond, pooled = clip.encode_from_tokens(clip.tokenize("a ohwx face"), return_pooled=True)
    return image, latent, cond, pooled


def bare_steps(autograd, model, latent, model_kwargs, steps: int, g, stamps: list, copy_norm_inputs: bool) -> None:
    """`steps` plain fwd+bwd passes of the model on one noised latent, a timestamp after each: the baseline row.

    `model_kwargs(latent)`: the conditioning; `copy_norm_inputs`: what DiTs need for autograd (as the node does).
    """
    import torch
    import comfy.model_management as mm

    with torch.inference_mode(False):
        lat = latent.clone()
        mm.load_models_gpu([model], force_full_load=True)
        ms = model.model.model_sampling
        kwargs = model_kwargs(lat)
        norms = autograd.layer_norm_inputs_copied(model.model if copy_norm_inputs else None)
        with autograd.trainable_through(model.model), norms:
            for _ in range(steps):
                noise = torch.randn(lat.shape, generator=g)
                sigma = torch.tensor([ms.percent_to_sigma(torch.rand((), generator=g).item() * 0.99 + 0.005)])
                xt = ms.noise_scaling(sigma, noise, lat).requires_grad_(True)
                out = model.model.apply_model(xt, sigma, **kwargs)
                ((out - lat) ** 2).mean().backward()
                stamps.append(time.perf_counter())


def add_worker_option(p) -> None:
    """The hidden `--worker METHOD SCALE RES STEPS THREADS` of a bench script (what `run_worker` passes)."""
    import argparse

    p.add_argument("--worker", nargs=5, metavar=("METHOD", "SCALE", "RES", "STEPS", "THREADS"), help=argparse.SUPPRESS)


def serve_worker(args, worker) -> bool:
    """In a worker process (`--worker` given): run `worker`, print its RESULT line and return True."""
    if not args.worker:
        return False
    m, s, r, n, t = args.worker
    print("RESULT " + json.dumps(worker(m, s, int(r), int(n), int(t))))
    return True
