"""The pack on a GPU, in one table: Fast Finetune, its floor and its peer on full-size SD1.5 and SDXL
(and, on request, the DiTs: `--archs flux1`, `sd35`, `flux2`, `zimage`, `qwenimage`).

Random weights of the real architectures (nothing is downloaded), built by devtools.tiny_models
and devtools.tiny_dits (DiTs at full size with 2-layer text encoders of the right widths):

  arch   dtype  ckpt  HDB_FastFinetune (steps at 512 px SD1.5 / 1024 px SDXL): wall s, s/step, peak VRAM
                      bare UNet forward+backward at the same size: s/step, peak VRAM
                      TrainLoraNode, rank 1 (ComfyUI's own trainer): s/step, peak VRAM
  plus the aux-basis build and a hypernetwork prediction (default config) per architecture.

Fast Finetune runs here with one draw per step, so a step is one forward+backward like the other
rows (after an untimed 2-step run per model and dtype: the aux bases' first build and the card's
first use of the shapes are in no row); its default (`draws_per_step` 4) makes a step four of them,
at the same peak memory.

On an NVIDIA machine after scripts/setup.sh (over 7 minutes on an H200: the first run there, without
the warm-up runs, was stopped at 400 s inside SDXL fp16; `--dtypes bf16` runs half the rows):

    .venv/bin/python bench/gpu_check.py                  # writes bench/out/gpu_check.md too
    .venv/bin/python bench/gpu_check.py --archs flux1    # full-size Flux.1 (12B) at 1024 px, bf16/fp16

`--tiny` runs the same code paths on tiny models at 64 px on the CPU in seconds; the test
suite runs it (tests/test_gpu_check.py). Until a GPU run exists, every VRAM figure in the
docs is an estimate.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _peak_reset(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device) -> str:
    import torch

    if device.type != "cuda":
        return "-"
    torch.cuda.synchronize()
    return f"{torch.cuda.max_memory_allocated() / 2 ** 30:.1f}"


class StepClock:
    """Times between ComfyUI progress updates of a bar of `steps` (one per training step); other bars
    (the aux-basis build on an architecture's first use) are not steps."""

    def __init__(self, device, steps: int):
        import comfy.utils

        self.device, self.steps, self.stamps = device, steps, []
        self._old = comfy.utils.PROGRESS_BAR_HOOK
        comfy.utils.set_progress_bar_global_hook(self._hook)

    def _hook(self, value, total, *args, **kwargs):
        import torch

        if total != self.steps:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())

    def per_step(self) -> float:
        gaps = [b - a for a, b in zip(self.stamps, self.stamps[1:])]
        return statistics.median(gaps[1:] or gaps) if gaps else float("nan")

    def close(self):
        import comfy.utils

        comfy.utils.set_progress_bar_global_hook(self._old)


def run_finetune(nodes, ckpt, image, steps, resolution, checkpointing, device) -> tuple[float, float, str]:
    from devtools.comfy_runtime import call_node

    model, clip, vae = ckpt
    _peak_reset(device)
    clock = StepClock(device, steps)
    t0 = time.perf_counter()
    try:
        call_node(nodes["HDB_FastFinetune"], model=model, clip=clip, vae=vae, image=image, steps=steps,
                  resolution=resolution, gradient_checkpointing=checkpointing, draws_per_step=1)
    finally:
        clock.close()
    return time.perf_counter() - t0, clock.per_step(), _peak_gib(device)


def run_bare(ckpt, resolution, steps, autocast, device) -> tuple[float, str]:
    """One UNet/DiT forward + backward to the input: the floor of any method that backpropagates."""
    import contextlib

    import torch

    import comfy.model_management as mm

    model, clip, _ = ckpt
    base = model.model
    _peak_reset(device)
    with torch.inference_mode(False):
        mm.load_models_gpu([model], force_full_load=True)
        cond, pooled = clip.encode_from_tokens(clip.tokenize("a ohwx face"), return_pooled=True)
        cond = cond.to(device).clone()
        pooled = pooled.to(device).clone() if pooled is not None else None
        latent = torch.randn(1, *_latent_shape(base, resolution), device=device)
        conds = base.extra_conds(cross_attn=cond, pooled_output=pooled, noise=latent, device=device,
                                 width=resolution, height=resolution, target_width=resolution,
                                 target_height=resolution)
        kwargs = {k: v.process_cond(batch_size=1, device=device, area=None).cond for k, v in conds.items()}
        ctx = torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext()
        times = []
        # DiT blocks add residuals in place after a LayerNorm: backward to the input needs its input copied
        autograd = sys.modules[_pack_nodes() + ".comfy_autograd"]
        norms = autograd.layer_norm_inputs_copied(None if _is_unet(model) else base.diffusion_model)
        with norms:
            for _ in range(steps):
                t0 = time.perf_counter()
                x = latent.clone().requires_grad_(True)
                with ctx:
                    out = base.apply_model(x, torch.tensor([5.0], device=device), **kwargs)
                out.float().pow(2).mean().backward()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
    return statistics.median(times[1:] or times), _peak_gib(device)


def _is_unet(model) -> bool:
    return sys.modules[_pack_nodes() + ".comfy_targets"].is_unet(model)


def _latent_shape(base, resolution: int) -> tuple:
    """[C, (1,) h, w] of the model's latent (Flux.2: 128 channels at 1/16; Qwen-Image: video-shaped)."""
    fmt = base.latent_format
    down = 16 if fmt.latent_channels == 128 else 8
    return (fmt.latent_channels, *((1,) if fmt.latent_dimensions == 3 else ()), resolution // down, resolution // down)


def run_trainlora(nodes, ckpt, resolution, steps, dtype_name, device) -> tuple[float, str]:
    """ComfyUI's trainer at rank 1 (on a DiT with its gradient checkpointing: 0.3.75 needs it there)."""
    import torch

    from devtools.comfy_runtime import call_node

    model, clip, _ = ckpt
    cond, pooled = clip.encode_from_tokens(clip.tokenize("a ohwx face"), return_pooled=True)
    latent = torch.randn(1, *_latent_shape(model.model, resolution))
    _peak_reset(device)
    clock = StepClock(device, steps)
    try:
        # Two latents: ComfyUI 0.3.75's trainer fails on a single one (multi_res unset).
        call_node(nodes["TrainLoraNode"], model=[model], latents=[{"samples": latent}, {"samples": latent}],
                  positive=[[[cond, {"pooled_output": pooled}]]], batch_size=[1], grad_accumulation_steps=[1],
                  steps=[steps], learning_rate=[1e-4], rank=[1], optimizer=["AdamW"], loss_function=["MSE"],
                  seed=[0], training_dtype=[dtype_name], lora_dtype=["fp32"], algorithm=["LoRA"],
                  gradient_checkpointing=[not _is_unet(model)], existing_lora=["[None]"])
    finally:
        clock.close()
    return clock.per_step(), _peak_gib(device)


def time_aux_and_prediction(model, clip, device) -> tuple[float, float]:
    import torch

    from hdb_core.hypernet.image_encoder import VIT_H_14
    from hdb_core.hypernet.model import HyperNetConfig, HyperNetwork
    from hdb_core.lidb.weights import LiDBConfig, aux_for_layers, clear_aux_cache

    ct = sys.modules[_pack_nodes() + ".comfy_targets"]
    layers = [t.spec for t in ct.model_targets(model).values()] + [t.spec for t in ct.clip_targets(clip).values()]
    clear_aux_cache()
    t0 = time.perf_counter()
    aux_for_layers(LiDBConfig(), layers)
    aux_s = time.perf_counter() - t0
    with torch.inference_mode(False), torch.no_grad():
        net = HyperNetwork(HyperNetConfig(), layers, LiDBConfig()).to(device).eval()
        features = torch.randn(1, VIT_H_14.num_tokens, VIT_H_14.hidden_size, device=device)
        net.predict_lidb(features)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        net.predict_lidb(features)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return aux_s, time.perf_counter() - t0


def _pack_nodes() -> str:
    from devtools import comfy_runtime

    return comfy_runtime._state["pack"].__name__ + ".nodes"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--tiny", action="store_true", help="tiny models at 64 px (runs on the CPU in seconds)")
    p.add_argument("--steps", type=int, default=None, help="finetune steps (default 40; 3 with --tiny)")
    p.add_argument("--archs", default="sd15,sdxl")
    p.add_argument("--dtypes", default="bf16,fp16", help="on a GPU: bf16, fp16 or both (the CPU runs fp32)")
    p.add_argument("--out", default=os.path.join(REPO, "bench", "out", "gpu_check.md"))
    args = p.parse_args(argv)

    import torch

    from devtools import comfy_runtime, tiny_dits, tiny_models

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # ComfyUI manages the GPU itself (text encoder and VAE devices, memory) unless booted with --cpu
    rt = comfy_runtime.boot(tempfile.mkdtemp(prefix="hdb_gpu_check_"), cpu=device.type == "cpu")
    nodes = rt["nodes"].NODE_CLASS_MAPPINGS
    if device.type == "cpu" and not args.tiny:
        print("no CUDA device: running the --tiny variant on the CPU")
        args.tiny = True
    steps = args.steps or (3 if args.tiny else 40)
    scale = "tiny" if args.tiny else "full"
    named = {"bf16": torch.bfloat16, "fp16": torch.float16}
    dtypes = {"fp32": torch.float32} if device.type == "cpu" else {d: named[d] for d in args.dtypes.split(",")}
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    header = (f"HyperDreamBooth GPU check on {gpu}, torch {torch.__version__}, {scale} models, "
              f"Fast Finetune {steps} steps")
    rows = ["| arch | dtype | grad. ckpt | what | wall s | s/step | peak VRAM GiB |",
            "|---|---|---|---|---|---|---|"]
    extras = []
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def failed(e: Exception) -> str:
        return f"failed: {type(e).__name__}: {str(e)[:80]}"

    def report(line: str | None = None, into: list = rows, error: Exception | None = None) -> None:
        """Adds a line and rewrites the report, so a run cut short keeps every row it finished."""
        if error is not None:
            traceback.print_exception(error)
        if line is not None:
            into.append(line)
            print(line, flush=True)
        with open(args.out + ".partial", "w") as f:
            f.write("\n".join([header, "", *rows, "", *extras]) + "\n")
        os.replace(args.out + ".partial", args.out)

    print(header, flush=True)
    for arch in args.archs.split(","):
        resolution = 64 if args.tiny else {"sd15": 512}.get(arch, 1024)
        image = torch.rand(1, resolution, resolution, 3, generator=torch.Generator().manual_seed(0))
        for dname, dtype in dtypes.items():
            if arch in tiny_dits.FAMILIES:
                # built outside inference mode, like the UNets here: 0.3.75's TrainLoraNode fails on a DiT
                # loaded under it (Fast Finetune handles both; tests/test_dit_families.py loads under it)
                ckpt = tiny_dits.comfy_dit_checkpoint(arch, scale, device=str(device), dtype=dtype)
            else:
                ckpt = tiny_models.comfy_checkpoint_of(arch, scale, device=str(device), dtype=dtype)
            try:  # untimed: the aux bases' first build and the card's first use of these shapes belong to no row
                run_finetune(nodes, ckpt, image, 2, resolution, False, device)
            except Exception as e:
                report(f"| {arch} | {dname} | off | warm-up | {failed(e)} | | |", error=e)
            for checkpointing in (False, True):
                try:
                    wall, per_step, peak = run_finetune(nodes, ckpt, image, steps, resolution, checkpointing, device)
                    report(f"| {arch} | {dname} | {'on' if checkpointing else 'off'} | HDB_FastFinetune | "
                           f"{wall:.1f} | {per_step:.3f} | {peak} |")
                except Exception as e:  # a row that fails says why; the rest still runs
                    report(f"| {arch} | {dname} | {'on' if checkpointing else 'off'} | HDB_FastFinetune | "
                           f"{failed(e)} | | |", error=e)
            autocast = None if device.type == "cpu" else dtype
            try:
                per_step, peak = run_bare(ckpt, resolution, max(3, min(steps, 10)), autocast, device)
                what = "bare DiT fwd+bwd" if arch in tiny_dits.FAMILIES else "bare UNet fwd+bwd"
                report(f"| {arch} | {dname} | off | {what} | | {per_step:.3f} | {peak} |")
            except Exception as e:
                report(f"| {arch} | {dname} | off | bare fwd+bwd | {failed(e)} | | |", error=e)
            try:
                per_step, peak = run_trainlora(nodes, ckpt, resolution, max(3, min(steps, 10)), dname, device)
                ckpt_on = "on" if arch in tiny_dits.FAMILIES else "off"
                report(f"| {arch} | {dname} | {ckpt_on} | TrainLoraNode rank 1 | | {per_step:.3f} | {peak} |")
            except Exception as e:
                report(f"| {arch} | {dname} | off | TrainLoraNode rank 1 | {failed(e)} | | |", error=e)
            if dname == next(iter(dtypes)):
                aux_s, predict_s = time_aux_and_prediction(ckpt[0], ckpt[1], device)
                report(f"{arch}: aux-basis build {aux_s:.2f} s, hypernetwork prediction {predict_s:.3f} s", extras)
            del ckpt
            if device.type == "cuda":
                torch.cuda.empty_cache()
    report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
