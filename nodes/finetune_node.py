"""HDB_FastFinetune: rank-relaxed LiDB finetuning on the photo, inside the graph."""
from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

import comfy.utils
import folder_paths
from comfy_api.latest import io

from hdb_core import defaults
from hdb_core.errors import HDBError
from hdb_core.lidb.subspace import IdentitySubspace, load_subspace
from hdb_core.lidb.targets import DIFFUSION_COMPONENTS
from hdb_core.lidb.weights import RELAXATIONS, LiDB, aux_for_layers
from hdb_core.plots import loss_curve_image, loss_curve_pil
from hdb_core.training.finetune import FinetuneSettings, check_relaxable, zero_start
from hdb_core.training.objective import check_prior
from . import comfy_objective as objective
from . import comfy_runtime as runtime
from . import comfy_targets as ct
from .comfy_training import finetune_on_model
from .folders import HYPERNET_FOLDER, resolve_model_file
from .photo_input import prepare_pixels
from .types import CATEGORY, LIDB

log = logging.getLogger("HyperDreamBooth")
NO_SUBSPACE = "none"


class FastFinetune(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HDB_FastFinetune",
            display_name="Fast Finetune LiDB (HyperDreamBooth)",
            category=CATEGORY,
            description="Finetune a LiDB identity on the photo with the model's own diffusion loss: from a "
                        "hypernetwork prediction (about 40 steps) or from zero without one (a few hundred steps). "
                        "Trains through the model's weights and weight patches (LoRAs); sampling-time patches "
                        "such as FreeU, ToMe, HyperTile or Deep Shrink are left out while training.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to personalise (SD1.x, SD2.x, SDXL, SD3.5, "
                                                "Flux.1, Flux.2, Z-Image or Qwen-Image); it is not changed."),
                io.Clip.Input("clip", tooltip="The checkpoint's CLIP; encodes the trigger phrase and is "
                                              "adapted too when train_text_encoder is on."),
                io.Vae.Input("vae", tooltip="The checkpoint's VAE; encodes the photo into latents."),
                io.Image.Input("image", tooltip="One photo of the person (or a batch of photos of the same "
                                                "person); resized and centre-cropped to resolution."),
                LIDB.Input("init_lidb", optional=True,
                           tooltip="Starting weights, e.g. the hypernetwork's prediction; leave empty to train "
                                   "from zero (then use more steps, about 300)."),
                io.String.Input("trigger", default=defaults.TRIGGER,
                                tooltip="The identity phrase with a rare token, as the paper's 'a [V] face'; "
                                        "use the same phrase in your prompts. Left at the default, an "
                                        "init_lidb's own trigger is used."),
                io.Int.Input("steps", default=defaults.FINETUNE_STEPS, min=1, max=10000,
                             tooltip=f"Optimisation steps: {defaults.FINETUNE_STEPS} from a hypernetwork "
                                     f"prediction (the paper); about {defaults.ZERO_START_STEPS} from zero."),
                io.Float.Input("learning_rate", default=defaults.FINETUNE_LR, min=1e-6, max=1.0, step=1e-5,
                               tooltip="AdamW learning rate of the LiDB train matrices."),
                io.Int.Input("relaxed_rank", default=defaults.RELAXED_RANK, min=1, max=64,
                             tooltip="Rank of the finetuned LiDB; the start (rank 1) becomes one of its "
                                     "components, so step 0 reproduces it exactly."),
                io.Boolean.Input("train_text_encoder", default=True,
                                 tooltip="Also adapt the CLIP text encoder, as in the paper."),
                io.Int.Input("resolution", default=defaults.RESOLUTION, min=64, max=2048, step=64,
                             tooltip="Training resolution in pixels (512 for SD1.x; 1024 for SDXL and the "
                                     "DiTs, or 512 to save memory)."),
                io.Int.Input("seed", default=0, min=0, max=2**63 - 1,
                             tooltip="Seed of noise, timesteps, mirroring and new rank components. On the CPU, "
                                     "the same inputs, seed and torch thread count give the same LiDB; GPUs "
                                     "and other thread counts differ in the last digits."),
                io.Boolean.Input("gradient_checkpointing", default=False, optional=True,
                                 tooltip="Recompute UNet layers or transformer blocks in the backward pass: fewer "
                                         "activations kept, more time. Turn on if training runs out of memory."),
                io.Boolean.Input("mirror", default=defaults.MIRROR, optional=True,
                                 tooltip="Also train on the mirrored photo (as the hypernetwork's training "
                                         "does). Turn off for faces whose asymmetry matters."),
                io.Combo.Input("relaxation", options=list(RELAXATIONS), default=defaults.RELAXATION, optional=True,
                               tooltip="aux_subspace: the new rank lives in the LiDB's frozen random bases "
                                       "(small file, e.g. 436 KB at rank 4 for SD1.5). free_lora: the paper's "
                                       "way: the start is kept and a free LoRA of relaxed_rank is trained "
                                       "beside it (a bigger file, still a standard LoRA on export)."),
                io.Combo.Input("identity_subspace", options=[NO_SUBSPACE] + folder_paths.get_filename_list(
                    HYPERNET_FOLDER), default=NO_SUBSPACE, optional=True,
                               tooltip="An identity subspace made with the hypernetwork ('hdb fit-subspace', "
                                       "'hdb pipeline' writes hypernet.subspace.safetensors; put it in "
                                       "models/hyperdreambooth): only the LiDB's move within it is trained, "
                                       "no rank relaxation. Without init_lidb it starts from the subspace's "
                                       f"mean. A learning_rate left at {defaults.FINETUNE_LR:g} becomes "
                                       f"{defaults.SUBSPACE_LR:g}."),
                # added last: saved workflows list widget values in input order
                io.Int.Input("draws_per_step", default=defaults.FINETUNE_DRAWS, min=1, max=64, optional=True,
                             tooltip="Losses averaged per step, each with its own noise and timestep: fewer "
                                     "noisy steps at the end of a short run. Each draw is one more forward "
                                     "and backward pass (time grows with it, memory does not); 1 is the "
                                     "plain one-draw step."),
                io.Float.Input("prior_weight", default=defaults.PRIOR_WEIGHT, min=0.0, max=10.0, step=0.05,
                               optional=True,
                               tooltip="Keep class_prompt's images as the base model makes them: on each drawn "
                                       "noisy photo the model's output for class_prompt is held to the bare "
                                       "model's, with this weight. The identity then stays on the trigger "
                                       "instead of changing every face. Each draw costs about twice the time "
                                       "and activation memory; 0 turns it off."),
                io.String.Input("class_prompt", default=defaults.CLASS_PROMPT, optional=True,
                                tooltip="The prompt whose images prior_weight keeps unchanged: the trigger "
                                        "phrase without its rare token, e.g. 'a face' or 'a photo of a man'."),
            ],
            outputs=[LIDB.Output(display_name="LIDB"), io.Image.Output(display_name="loss_curve")],
        )

    @classmethod
    def execute(cls, model, clip, vae, image, trigger=defaults.TRIGGER, steps=defaults.FINETUNE_STEPS,
                learning_rate=defaults.FINETUNE_LR, relaxed_rank=defaults.RELAXED_RANK, train_text_encoder=True,
                resolution=defaults.RESOLUTION, seed=0, init_lidb: LiDB | None = None,
                gradient_checkpointing=False, mirror=defaults.MIRROR,
                relaxation=defaults.RELAXATION, identity_subspace=NO_SUBSPACE,
                draws_per_step=defaults.FINETUNE_DRAWS, prior_weight=defaults.PRIOR_WEIGHT,
                class_prompt=defaults.CLASS_PROMPT) -> io.NodeOutput:
        if steps < 1:
            raise HDBError(f"steps is {steps}; use at least 1 ({defaults.FINETUNE_STEPS} from a prediction, "
                           f"about {defaults.ZERO_START_STEPS} from zero).")
        check_prior(prior_weight, class_prompt)
        if resolution % 8 or resolution < 64:
            raise HDBError(f"resolution {resolution} is not a multiple of 8 of at least 64; use 512 (SD1.x) "
                           f"or 1024 (SDXL).")
        trigger = chosen_trigger(trigger, init_lidb)
        unet_t = ct.model_targets(model)
        ct.require_targets(unet_t, "model", model)
        family = ct.model_family(model)
        model_parts = {t.spec.component for t in unet_t.values()}
        if clip is None:
            raise HDBError("No CLIP is connected; connect the checkpoint's CLIP (it encodes the trigger phrase).")
        clip_t = ct.clip_targets(clip)
        frozen = ct.frozen_text_encoders(clip)
        if train_text_encoder and frozen:
            log.info("HyperDreamBooth: text encoder(s) %s stay frozen (only CLIP-family encoders are adapted)%s.",
                     ", ".join(frozen), "" if clip_t else "; this model's identity is learnt by the transformer alone")
        elif train_text_encoder and not clip_t:
            ct.require_targets(clip_t, "CLIP")

        from_init = "from init" if init_lidb is not None else "from zero"
        source = "finetuned" if init_lidb is not None else "trained"
        subspace = chosen_subspace(identity_subspace)
        if subspace is not None:
            learning_rate = subspace_lr(learning_rate)
            if init_lidb is None:
                init_lidb, from_init = subspace.lidb(subspace.mean, source="trained"), "from the subspace mean"
            subspace.check_fits(init_lidb)
        generator = torch.Generator().manual_seed(int(seed))
        # Text-encoder layers whose output this CLIP never uses would stay zero: they are left out.
        unused = ct.unused_clip_layers(clip, model)
        if unused and train_text_encoder:
            log.info("HyperDreamBooth: %d text-encoder layers after the CLIP layer in use are not trained.",
                     len(unused))
        wanted = [t.spec for t in unet_t.values()] + (
            [t.spec for n, t in clip_t.items() if n not in unused] if train_text_encoder else [])
        if init_lidb is None:    # (with a subspace there is always a start: its mean)
            start = zero_start(wanted, relaxed_rank, generator, relaxation, source="trained")
            if family:
                start = start.with_info(family=family)
            if steps < defaults.ZERO_START_STEPS // 2:
                log.warning("HyperDreamBooth: training from zero with only %d steps; about %d are advised "
                            "without a hypernetwork prediction.", steps, defaults.ZERO_START_STEPS)
        else:
            if subspace is None:
                check_relaxable(init_lidb, relaxed_rank, relaxation)
            lidb_parts = {s.component for s in init_lidb.layers}
            te_parts = lidb_parts - set(DIFFUSION_COMPONENTS)
            # the start's own diffusion-model layers (a DiT LiDB on a UNet has none of the UNet's)
            ct.check_compatible(init_lidb, unet_t, (lidb_parts - te_parts) | model_parts, "model", family)
            if te_parts:
                ct.check_compatible(init_lidb, clip_t, te_parts, "CLIP")
            missing = [s for s in wanted if s.name not in init_lidb.spec_by_name]
            start = init_lidb.with_info(source=source, **({"family": family} if family else {}))
            if missing and subspace is None:  # e.g. a UNet-only start with the text encoder trained: from zero
                start = _extend(start, missing, generator)

        aux_for_layers(start.config, start.layers, runtime.progress_bar())  # first use of an architecture
        pixels = prepare_pixels(image, resolution)
        latents = objective.encode_photo_latents(vae, model.model, pixels, mirror)
        device = model.load_device
        autocast, loss_scaling = runtime.training_precision(device, runtime.model_dtype(model))
        te_components = {s.component for s in start.layers} - set(DIFFUSION_COMPONENTS)
        components = model_parts | (te_components if train_text_encoder else set())
        settings = FinetuneSettings(steps=int(steps), learning_rate=float(learning_rate),
                                    draws_per_step=int(draws_per_step),
                                    relaxed_rank=int(relaxed_rank), relaxation=relaxation, seed=int(seed),
                                    device=device,
                                    autocast_dtype=autocast, loss_scaling=loss_scaling,
                                    trainable=frozenset(components), subspace=subspace)
        info = {"trigger": trigger, "base_model": start.info.get("base_model")
                or type(model.model.model_config).__name__}
        with _Progress(settings.steps) as progress:
            result = finetune_on_model(model, clip, latents, start, trigger, resolution, settings,
                                       train_text_encoder, mirror, gradient_checkpointing, progress,
                                       prior_weight=float(prior_weight), class_prompt=class_prompt, **info)
        how = "identity subspace" if subspace is not None else f"{relaxation} rank {relaxed_rank}"
        prior = f", prior {prior_weight:g}" if prior_weight > 0 else ""
        title = f"HDB Fast Finetune: {from_init}, {how}, lr {learning_rate:g}{prior}"
        return io.NodeOutput(result.lidb, loss_curve_image(result.losses, title))


def chosen_subspace(name: str | None) -> IdentitySubspace | None:
    if not name or name == NO_SUBSPACE:
        return None
    return load_subspace(resolve_model_file(HYPERNET_FOLDER, name, "identity subspace"))


def subspace_lr(typed: float) -> float:
    """A rate left at the train matrices' default means the subspace's own (coefficients have another scale)."""
    if float(typed) == defaults.FINETUNE_LR:
        log.info("HyperDreamBooth: finetuning in the identity subspace at its learning rate %g.",
                 defaults.SUBSPACE_LR)
        return defaults.SUBSPACE_LR
    return float(typed)


def chosen_trigger(typed: str, init_lidb: LiDB | None) -> str:
    """The phrase to train: what the user typed, else (left at the default) the init LiDB's own trigger."""
    typed = (typed or "").strip()
    carried = (init_lidb.info.get("trigger") or "").strip() if init_lidb is not None else ""
    if carried and typed in ("", defaults.TRIGGER) and carried != typed:
        log.info("HyperDreamBooth: training with the init LiDB's trigger %r (type another trigger to override).",
                 carried)
        return carried
    if not typed:
        raise HDBError(f"trigger is empty; give the identity phrase you will prompt with, such as "
                       f"'{defaults.TRIGGER}'.")
    log.info("HyperDreamBooth: training with the trigger %r.", typed)
    return typed


class _Progress:
    """ProgressBar (with a live loss-curve preview; it also polls Cancel), console bar and node text."""

    def __init__(self, steps: int):
        self.steps = steps
        self.losses: list[float] = []
        self.every = max(5, steps // 10)  # a preview costs a few ms to draw

    def __enter__(self):
        self.bar = comfy.utils.ProgressBar(self.steps)
        self.console = tqdm(total=self.steps, desc="HDB Fast Finetune", disable=not comfy.utils.PROGRESS_BAR_ENABLED)
        return self

    def __call__(self, step: int, total: int, loss: float) -> None:
        self.losses.append(loss)
        self.console.set_postfix(loss=f"{loss:.4f}")
        self.console.update(1)
        runtime.report_text(f"step {step}/{total}  loss {loss:.4f}")
        preview = (("JPEG", loss_curve_pil(self.losses, "loss so far"), 640)
                   if step % self.every == 0 or step == total else None)
        self.bar.update_absolute(step, total, preview)

    def __exit__(self, *exc) -> None:
        self.console.close()


def _extend(lidb: LiDB, specs, generator) -> LiDB:
    extra = zero_start(specs, lidb.config.rank, generator)
    layers = lidb.layers + tuple(specs)
    return LiDB(layers, lidb.config, {**lidb.a_train, **extra.a_train}, {**lidb.b_train, **extra.b_train},
                dict(lidb.info))


NODES = [FastFinetune]
