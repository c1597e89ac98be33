"""HDB_FastFinetune: rank-relaxed LiDB finetuning on the photo, inside the graph."""
from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

import comfy.model_management
import comfy.utils
from comfy_api.latest import io

from ..hdb_core.errors import HDBError
from ..hdb_core.finetune import FinetuneSettings, check_relaxable, finetune, zero_start
from ..hdb_core.lidb import LiDB
from ..hdb_core.loss_plot import loss_curve_image, loss_curve_pil
from . import comfy_targets as ct
from . import comfy_training as tr
from .types import CATEGORY, LIDB

log = logging.getLogger("HyperDreamBooth")

DEFAULT_TRIGGER = "a ohwx face"
DEFAULT_STEPS = 40              # the paper's value, from a hypernetwork prediction
ZERO_START_STEPS_ADVICE = 300   # from zero (no init_lidb): see docs/finetune.md
DEFAULT_LR = 3e-3
DEFAULT_RANK = 4


class FastFinetune(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HDB_FastFinetune",
            display_name="Fast Finetune LiDB (HyperDreamBooth)",
            category=CATEGORY,
            description="Finetune a LiDB identity on the photo with the model's own diffusion loss: from a "
                        "hypernetwork prediction (about 40 steps) or from zero without one (a few hundred steps).",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to personalise (SD1.x, SD2.x or SDXL); "
                                                "it is not changed."),
                io.Clip.Input("clip", tooltip="The checkpoint's CLIP; encodes the trigger phrase and is "
                                              "adapted too when train_text_encoder is on."),
                io.Vae.Input("vae", tooltip="The checkpoint's VAE; encodes the photo into latents."),
                io.Image.Input("image", tooltip="One photo of the person (or a batch of photos of the same "
                                                "person); resized and centre-cropped to resolution."),
                LIDB.Input("init_lidb", optional=True,
                           tooltip="Starting weights, e.g. the hypernetwork's prediction; leave empty to train "
                                   "from zero (then use more steps, about 300)."),
                io.String.Input("trigger", default=DEFAULT_TRIGGER,
                                tooltip="The identity phrase with a rare token, as the paper's 'a [V] face'; "
                                        "use the same phrase in your prompts."),
                io.Int.Input("steps", default=DEFAULT_STEPS, min=1, max=10000,
                             tooltip=f"Optimisation steps: {DEFAULT_STEPS} from a hypernetwork prediction "
                                     f"(the paper); about {ZERO_START_STEPS_ADVICE} from zero."),
                io.Float.Input("learning_rate", default=DEFAULT_LR, min=1e-6, max=1.0, step=1e-5,
                               tooltip="AdamW learning rate of the LiDB train matrices."),
                io.Int.Input("relaxed_rank", default=DEFAULT_RANK, min=1, max=64,
                             tooltip="Rank of the finetuned LiDB; the start (rank 1) becomes one of its "
                                     "components, so step 0 reproduces it exactly."),
                io.Boolean.Input("train_text_encoder", default=True,
                                 tooltip="Also adapt the CLIP text encoder, as in the paper."),
                io.Int.Input("resolution", default=512, min=64, max=2048, step=64,
                             tooltip="Training resolution in pixels (512 for SD1.x, 1024 for SDXL)."),
                io.Int.Input("seed", default=0, min=0, max=2**63 - 1,
                             tooltip="Seed of noise, timesteps and new rank components; same inputs and seed "
                                     "give the same LiDB on CPU."),
                io.Boolean.Input("gradient_checkpointing", default=False, optional=True,
                                 tooltip="Recompute UNet blocks in the backward pass: less VRAM, about 30% "
                                         "slower. Turn on if training runs out of memory."),
            ],
            outputs=[LIDB.Output(display_name="LIDB"), io.Image.Output(display_name="loss_curve")],
        )

    @classmethod
    def execute(cls, model, clip, vae, image, trigger=DEFAULT_TRIGGER, steps=DEFAULT_STEPS,
                learning_rate=DEFAULT_LR, relaxed_rank=DEFAULT_RANK, train_text_encoder=True, resolution=512,
                seed=0, init_lidb: LiDB | None = None, gradient_checkpointing=False) -> io.NodeOutput:
        if steps < 1:
            raise HDBError(f"steps is {steps}; use at least 1 ({DEFAULT_STEPS} from a prediction, "
                           f"about {ZERO_START_STEPS_ADVICE} from zero).")
        if not trigger or not trigger.strip():
            raise HDBError(f"trigger is empty; give the identity phrase you will prompt with, "
                           f"such as '{DEFAULT_TRIGGER}'.")
        if resolution % 8 or resolution < 64:
            raise HDBError(f"resolution {resolution} is not a multiple of 8 of at least 64; use 512 (SD1.x) "
                           f"or 1024 (SDXL).")
        unet_t = ct.unet_targets(model)
        ct.require_targets(unet_t, "model")
        if clip is None:
            raise HDBError("No CLIP is connected; connect the checkpoint's CLIP (it encodes the trigger phrase).")
        clip_t = ct.clip_targets(clip)
        if train_text_encoder:
            ct.require_targets(clip_t, "CLIP")

        generator = torch.Generator().manual_seed(int(seed))
        wanted = [t.spec for t in unet_t.values()] + ([t.spec for t in clip_t.values()] if train_text_encoder else [])
        if init_lidb is None:
            start = zero_start(wanted, relaxed_rank, generator, source="trained")
            if steps < ZERO_START_STEPS_ADVICE // 2:
                log.warning("HyperDreamBooth: training from zero with only %d steps; about %d are advised "
                            "without a hypernetwork prediction.", steps, ZERO_START_STEPS_ADVICE)
        else:
            check_relaxable(init_lidb, relaxed_rank)
            te_parts = {s.component for s in init_lidb.layers} - {"unet"}
            ct.check_compatible(init_lidb, unet_t, {"unet"}, "model")
            if te_parts:
                ct.check_compatible(init_lidb, clip_t, te_parts, "CLIP")
            missing = [s for s in wanted if s.name not in init_lidb.spec_by_name]
            start = init_lidb.with_info(source="finetuned")
            if missing:  # e.g. a UNet-only start with train_text_encoder on: those layers start at zero
                start = _extend(start, missing, generator)

        pixels = tr.prepare_pixels(image, resolution)
        latents = tr.encode_latents(vae, model.model, pixels)
        device = model.load_device
        autocast, loss_scaling = tr.training_precision(device, tr.model_dtype(model))
        components = {"unet"} | ({s.component for s in start.layers} - {"unet"} if train_text_encoder else set())
        settings = FinetuneSettings(steps=int(steps), learning_rate=float(learning_rate),
                                    relaxed_rank=int(relaxed_rank), seed=int(seed), device=device,
                                    autocast_dtype=autocast, loss_scaling=loss_scaling,
                                    trainable=frozenset(components))
        info = {"trigger": trigger, "base_model": start.info.get("base_model")
                or type(model.model.model_config).__name__}
        result = _train(model, clip, start, latents, trigger, resolution, settings, train_text_encoder,
                        gradient_checkpointing, unet_t, clip_t, info)
        title = (f"HDB Fast Finetune: {'from init' if init_lidb is not None else 'from zero'}, "
                 f"rank {relaxed_rank}, lr {learning_rate:g}")
        return io.NodeOutput(result.lidb, loss_curve_image(result.losses, title))


def _extend(lidb: LiDB, specs, generator) -> LiDB:
    extra = zero_start(specs, lidb.config.rank, generator)
    layers = lidb.layers + tuple(specs)
    return LiDB(layers, lidb.config, {**lidb.a_train, **extra.a_train}, {**lidb.b_train, **extra.b_train},
                dict(lidb.info))


def _train(model, clip, start, latents, trigger, resolution, settings, train_te, checkpointing,
           unet_t, clip_t, info):
    base = model.model
    te_layers = {s.name for s in start.layers} - {n for n in unet_t}
    pbar = comfy.utils.ProgressBar(settings.steps)
    console = tqdm(total=settings.steps, desc="HDB Fast Finetune", disable=not comfy.utils.PROGRESS_BAR_ENABLED)

    losses = []
    every = max(5, settings.steps // 10)  # a preview costs a few ms to draw

    def progress(step, total, loss):
        losses.append(loss)
        console.set_postfix(loss=f"{loss:.4f}")
        console.update(1)
        tr.report_text(f"step {step}/{total}  loss {loss:.4f}")
        # The live loss curve as the node's preview (the hook also polls Cancel).
        preview = ("JPEG", loss_curve_pil(losses, "loss so far"), 640) if step % every == 0 or step == total else None
        pbar.update_absolute(step, total, preview)

    with torch.inference_mode(False):
        latents = latents.detach().clone().to(settings.device)
        tr.load_for_training(model, clip.patcher, latents[:1].shape, checkpointing)
        layers = tr.target_modules(base, unet_t)
        if te_layers:
            layers.update(tr.target_modules(clip.cond_stage_model, {n: clip_t[n] for n in te_layers}))
        encode = tr.TextEncoder(clip, trigger)
        modules = [base] + ([clip.cond_stage_model] if te_layers or train_te else [])
        try:
            with tr.trainable_through(*modules), tr.LowRankPaths(layers) as paths, \
                    tr.layer_norm_inputs_copied(clip.cond_stage_model), \
                    tr.gradient_checkpointing(base.diffusion_model, checkpointing):
                fixed = None
                if not train_te:
                    # The text encoder stays frozen: encode once, with the start's TE residuals if it has any.
                    paths.factors = {n: start.down_up(n) for n in te_layers}
                    with torch.no_grad():
                        fixed = tuple(t.detach() if t is not None else None for t in encode())
                loss = tr.DiffusionLoss(model, latents, paths, encode if train_te else None, fixed,
                                        resolution, settings.device)
                return finetune(start, loss, settings, progress=progress, check_cancel=tr.check_interrupt, **info)
        finally:
            console.close()
            comfy.model_management.soft_empty_cache()


NODES = [FastFinetune]
