"""`hdb`: the HyperDreamBooth training pipeline and personalisation outside ComfyUI.

    hdb pipeline        prepare + stage 0 + stage 1 in one command (a face folder in, a hypernetwork out)
    hdb prepare         faces checked, latents and image features encoded once, as shards
    hdb preoptimize     stage 0: one LiDB per identity of a face dataset
    hdb train-hypernet  stage 1: the hypernetwork, from photos and their stage-0 LiDBs
    hdb predict         a LiDB from a photo with a trained hypernetwork
    hdb finetune        rank-relaxed fast finetuning of a LiDB on a photo (stage 2)
    hdb export-lora     a LiDB as a standard kohya LoRA file

Multi-GPU / multi-machine: `accelerate launch [--num_processes N ...] -m hdb_core.cli preoptimize ...`
(or `accelerate launch $(which hdb) ...`). Every command works offline: models are
local folders/files, and what is missing is named in the error.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from hdb_core import defaults
from hdb_core.errors import HDBError

log = logging.getLogger("hdb")


# -- shared arguments ---------------------------------------------------------------------------
def _prior_args(p, weight: float = defaults.STAGE_PRIOR_WEIGHT) -> None:
    """The prior term's flags, the same for stage 0, stage 1 and the finetune (objective.PriorTerm); the
    default weight is stage 0's and 1's unless given (the finetune's)."""
    p.add_argument("--prior-weight", type=float, default=weight,
                   help="hold --class-prompt's output to the base model's on each drawn noisy photo, with this "
                        "weight (default %(default)g; about twice the time per draw; 0: off)")
    p.add_argument("--class-prompt", default=defaults.CLASS_PROMPT,
                   help="the prompt --prior-weight keeps unchanged: the trigger phrase without its rare token")


def _base_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-model", required=True,
                   help="local diffusers folder of SD1.x/2.x, or a single-file .safetensors checkpoint")
    p.add_argument("--base-config", default=None,
                   help="for a single-file checkpoint: a local diffusers folder with the same architecture's configs")


def _data_args(p: argparse.ArgumentParser, face_check: str = "detect") -> None:
    p.add_argument("--resolution", type=int, default=defaults.RESOLUTION,
                   help="training image size in pixels (512 for SD1.5)")
    p.add_argument("--face-check", choices=("none", "detect", "crop"), default=face_check,
                   help="skip images without a detectable face (detect), also crop to the face (crop), or trust "
                        "the data (none)")
    p.add_argument("--min-size", type=int, default=128, help="skip images smaller than this on the short side")


def _run_args(p: argparse.ArgumentParser) -> None:
    _trigger_args(p)
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw (runs are reproducible)")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="dtype of the frozen UNet/text encoder (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--no-flip", action="store_true", help="no horizontal-flip augmentation")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")


def _gpu_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--autocast", choices=("auto", "bf16", "off"), default="auto",
                   help="bf16 autocast of the training forward (auto: on CUDA cards with bf16, off on CPU)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute UNet activations in the backward pass: less GPU memory, ~30%% more time")


def _prepare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shard-size", type=int, default=64, help="identities per shard file")
    p.add_argument("--encode-batch", type=int, default=16, help="photos encoded together")


def _stage1_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--warmup-steps", type=int, default=500)
    p.add_argument("--alpha", type=float, default=1.0,
                   help="weight of the diffusion reconstruction loss (0: regress onto the stage-0 LiDBs only)")
    p.add_argument("--beta", type=float, default=None,
                   help="the L2 term's gradient relative to the diffusion term's, at the predicted weights "
                        f"(default {defaults.STAGE1_BETA:g}: equal shares; with --subspace-components "
                        f"{defaults.SUBSPACE_STAGE1_BETA:g}: the diffusion term alone; the raw ratio is logged as "
                        f"weight_to_diffusion_grad)")
    p.add_argument("--subspace-components", type=int, default=0,
                   help="k > 0: train the subspace hypernetwork instead of the paper's transformer, one linear map "
                        "from the photo to coordinates along the top k principal directions of the stage-0 LiDBs "
                        "(128 is a good value; docs/evidence.md); 0: the transformer")
    p.add_argument("--weight-space", choices=("factors", "delta"), default="factors",
                   help="the L2 term on the A/B factors (the paper) or on each layer's weight change dW, which "
                        "ignores how a rank-1 update is split between its factors")
    p.add_argument("--weight-length", choices=("joint", "separate"), default="joint",
                   help="joint: the paper's L2 on the A/B factors; separate: the same loss, but its gradient pulls "
                        "the prediction's distance from the mean LiDB to the target's, so an uncertain direction "
                        "does not shorten it (factors only)")
    p.add_argument("--diffusion-photo", choices=("input", "other"), default="input",
                   help="the photo the diffusion term reconstructs: the one the network sees (the paper) or "
                        "another photo of the same person (identities with one photo use their own)")
    p.add_argument("--input-photos", type=int, default=1,
                   help="show the network 1..N photos of the person at once (a count drawn per step), so that it "
                        "learns to predict from several photos as the nodes allow (1: one photo, the paper)")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--width", type=int, default=512, help="hypernetwork decoder width")
    p.add_argument("--depth", type=int, default=2, help="decoder layers (paper: 2)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--iterations", type=int, default=4, help="refinement passes s")
    p.add_argument("--ema-decay", type=float, default=0.999,
                   help="also write <output>.ema.safetensors with these averaged weights (0: no EMA)")
    p.add_argument("--val-identities", type=int, default=32,
                   help="identities held out for validation at each checkpoint (at most a fifth of them)")
    p.add_argument("--workers", type=int, default=-1, help="data-loader processes (-1: 4 on CUDA, 0 on CPU)")


def _option_names(*groups) -> tuple[str, ...]:
    """Every option these argument groups define: what `hdb pipeline` hands on to its steps."""
    p = argparse.ArgumentParser(add_help=False)
    for add in groups:
        add(p)
    return tuple(action.dest for action in p._actions)


def _trigger_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trigger", default=defaults.TRIGGER,
                   help="the identity phrase with its rare token (the paper's 'a [V] face'); prompt with it later")
    p.add_argument("--prompt", default="{trigger}",
                   help="training prompt; {trigger} is replaced by the trigger phrase")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hdb", description="HyperDreamBooth training and personalisation.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pipeline", help="prepare + stage 0 + stage 1: a face folder in, a hypernetwork out")
    p.add_argument("--data", required=True, help="folder: one face image per identity, or a subfolder per identity")
    p.add_argument("--output", required=True,
                   help="run folder: prepared/, lidbs/, hypernet.safetensors, hypernet.ema.safetensors and "
                        "hypernet.subspace.safetensors")
    p.add_argument("--image-encoder", default=None,
                   help="local CLIP vision folder (default: <base-model>/image_encoder); e.g. CLIP-ViT-H-14")
    _base_args(p)
    _data_args(p)
    _run_args(p)
    _gpu_args(p)
    _prepare_args(p)
    p.add_argument("--stage0-steps", type=int, default=defaults.STAGE0_STEPS)
    p.add_argument("--stage0-lr", type=float, default=defaults.STAGE0_LR)
    p.add_argument("--stage0-lr-schedule", choices=defaults.STAGE0_LR_SCHEDULES, default=defaults.STAGE0_LR_SCHEDULE)
    p.add_argument("--stage0-decay-to-start", type=float, default=defaults.STAGE0_DECAY_TO_START)
    p.add_argument("--stage0-repeats", type=int, default=defaults.STAGE0_REPEATS)
    p.add_argument("--stage0-batch-size", type=int, default=8,
                   help="LiDBs trained together per process (identities x repeats)")
    p.add_argument("--stage1-steps", type=int, default=defaults.STAGE1_STEPS)
    p.add_argument("--stage1-lr", type=float, default=defaults.STAGE1_LR)
    p.add_argument("--stage1-batch-size", type=int, default=4, help="photos per process per step")
    p.add_argument("--checkpoint-every", type=int, default=500, help="stage-1 steps between checkpoints")
    _stage1_args(p)
    _prior_args(p)      # stage 0 and stage 1 alike

    p = sub.add_parser("prepare", help="check faces and encode latents and image features once, for stages 0 and 1")
    p.add_argument("--data", required=True, help="folder: one face image per identity, or a subfolder per identity")
    p.add_argument("--output", required=True, help="folder for the shards and their index")
    p.add_argument("--image-encoder", default=None,
                   help="local CLIP vision folder (default: <base-model>/image_encoder); e.g. CLIP-ViT-H-14")
    _base_args(p)
    _data_args(p)
    _prepare_args(p)
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="dtype of the image encoder (auto: bf16 on CUDA, fp32 on CPU); the VAE stays fp32")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")

    p = sub.add_parser("preoptimize", help="stage 0: pre-optimise one LiDB per identity")
    p.add_argument("--data", required=True, help="a folder made by `hdb prepare`, or a face folder: one image per "
                                                 "identity, or a subfolder per identity")
    p.add_argument("--output", required=True, help="folder for <identity>.safetensors LiDB files")
    _base_args(p)
    _data_args(p)
    _run_args(p)
    _gpu_args(p)
    p.add_argument("--steps", type=int, default=defaults.STAGE0_STEPS, help="optimisation steps per identity")
    p.add_argument("--lr", type=float, default=defaults.STAGE0_LR, help="Adam learning rate")
    p.add_argument("--lr-schedule", choices=defaults.STAGE0_LR_SCHEDULES, default=defaults.STAGE0_LR_SCHEDULE,
                   help="cosine: decay the learning rate to zero over the steps")
    p.add_argument("--decay-to-start", type=float, default=defaults.STAGE0_DECAY_TO_START,
                   help="L2 pull of every LiDB toward the common start (0: off); makes the targets reproducible, "
                        "see docs/evidence.md")
    p.add_argument("--repeats", type=int, default=defaults.STAGE0_REPEATS,
                   help="independent runs per identity from the common start, their offsets averaged and scaled back "
                        "to a run's length: targets with less of stage 0's own noise, at repeats times the compute "
                        "(see docs/evidence.md)")
    _prior_args(p)
    p.add_argument("--batch-size", type=int, default=8,
                   help="LiDBs trained together per process (identities x repeats)")
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints within a batch")
    p.add_argument("--a", type=int, default=100, help="LiDB down-projection dimension a (paper: 100)")
    p.add_argument("--b", type=int, default=50, help="LiDB up-projection dimension b (paper: 50)")
    p.add_argument("--rank", type=int, default=1, help="LiDB rank (paper: 1)")
    p.add_argument("--lidb-seed", type=int, default=0, help="seed of the frozen aux bases (stored in every file)")
    p.add_argument("--no-text-encoder", action="store_true", help="adapt the UNet only")

    p = sub.add_parser("train-hypernet", help="stage 1: train the hypernetwork")
    p.add_argument("--data", required=True,
                   help="a folder made by `hdb prepare`, or the face folder stage 0 was run on (it is then prepared "
                        "first into <output>.state/prepared)")
    p.add_argument("--lidbs", required=True, help="the stage-0 output folder")
    p.add_argument("--output", required=True, help="hypernetwork file to write (.safetensors)")
    p.add_argument("--image-encoder", default=None,
                   help="local CLIP vision folder (default: <base-model>/image_encoder); e.g. CLIP-ViT-H-14; not "
                        "needed with prepared --data")
    _base_args(p)
    _data_args(p)
    _run_args(p)
    _gpu_args(p)
    p.add_argument("--steps", type=int, default=defaults.STAGE1_STEPS)
    p.add_argument("--lr", type=float, default=defaults.STAGE1_LR,
                   help="AdamW peak learning rate (cosine decay after warm-up)")
    p.add_argument("--batch-size", type=int, default=4, help="photos per process per step")
    p.add_argument("--checkpoint-every", type=int, default=500,
                   help="steps between checkpoints, validations and plot updates")
    _stage1_args(p)
    _prior_args(p)

    p = sub.add_parser("predict", help="predict a LiDB from face photo(s) with a trained hypernetwork")
    p.add_argument("--hypernet", required=True)
    p.add_argument("--image-encoder", required=True, help="local CLIP vision folder the hypernetwork was trained with")
    p.add_argument("--image", required=True, nargs="+", help="one or more photos of the same person")
    p.add_argument("--output", required=True, help="LiDB file to write")
    p.add_argument("--lora", default=None, help="also write a kohya LoRA file here")
    p.add_argument("--trigger", default=None, help="identity phrase stored in the LiDB (default: the hypernetwork's)")
    p.add_argument("--iterations", type=int, default=None, help="refinement passes (default: the file's)")
    p.add_argument("--face-check", choices=("none", "detect", "crop"), default="crop")
    p.add_argument("--cpu", action="store_true")

    p = sub.add_parser("finetune", help="rank-relaxed fast finetuning (stage 2) of a LiDB on a photo")
    p.add_argument("--image", required=True, nargs="+", help="photo(s) of the person")
    p.add_argument("--output", required=True, help="LiDB file to write")
    p.add_argument("--init", default=None, help="start LiDB (e.g. from `hdb predict`); default: zero residual")
    p.add_argument("--lora", default=None, help="also write a kohya LoRA file here")
    _base_args(p)
    p.add_argument("--resolution", type=int, default=defaults.RESOLUTION)
    p.add_argument("--face-check", choices=("none", "detect", "crop"), default="crop")
    p.add_argument("--trigger", default=None,
                   help=f"identity phrase (default: the --init LiDB's trigger, else '{defaults.TRIGGER}')")
    p.add_argument("--prompt", default="{trigger}", help="training prompt; {trigger} is replaced")
    p.add_argument("--steps", type=int, default=defaults.FINETUNE_STEPS,
                   help=f"paper: {defaults.FINETUNE_STEPS} from a prediction; about {defaults.ZERO_START_STEPS} "
                        f"without --init")
    p.add_argument("--lr", type=float, default=None,
                   help=f"default {defaults.FINETUNE_LR:g}; with --subspace {defaults.SUBSPACE_LR:g}")
    p.add_argument("--rank", type=int, default=defaults.RELAXED_RANK, help="relaxed rank")
    p.add_argument("--draws", type=int, default=defaults.FINETUNE_DRAWS,
                   help="losses (own noise and timestep) averaged per step; each is one more forward and backward")
    p.add_argument("--subspace", default=None,
                   help="identity subspace from `hdb fit-subspace`: move only within it (no rank relaxation); "
                        "without --init, start from its mean")
    p.add_argument("--relaxation", choices=("aux_subspace", "free_lora"), default=defaults.RELAXATION,
                   help="new rank inside the aux bases (small file), or the paper's free LoRA beside the start")
    _prior_args(p, defaults.PRIOR_WEIGHT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-flip", action="store_true", help="train on the photo(s) as given, without mirrored copies")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--cpu", action="store_true")

    p = sub.add_parser("fit-subspace", help="the identity subspace of stage-0 LiDBs (for finetune --subspace)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--lidbs", help="stage-0 output folder (the hypernetwork's targets)")
    source.add_argument("--hypernet", help="a subspace hypernetwork (--subspace-components): write the subspace it "
                                           "predicts in, the one to finetune its predictions within")
    p.add_argument("--output", required=True, help="subspace file to write")
    p.add_argument("--components", type=int, default=defaults.SUBSPACE_COMPONENTS,
                   help="principal directions kept (at most one fewer than there are LiDBs)")

    p = sub.add_parser("export-lora", help="write a LiDB as a standard kohya LoRA")
    p.add_argument("--lidb", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp16")
    return parser


# -- commands ------------------------------------------------------------------------------------
def _encoder_path(args) -> str:
    if args.image_encoder is not None:
        return args.image_encoder
    default = os.path.join(args.base_model, "image_encoder")
    if os.path.isdir(default):
        return default
    raise HDBError("Preparing photos needs the CLIP vision encoder of stage 1: pass --image-encoder with a local "
                   "folder (config.json and model.safetensors, e.g. CLIP-ViT-H-14-laion2B) - nothing is "
                   "downloaded.")


def cmd_prepare(args) -> int:
    from hdb_core.training.prepared import PrepareSettings, prepare

    settings = PrepareSettings(resolution=args.resolution, face_check=args.face_check, min_size=args.min_size,
                               shard_size=args.shard_size, batch_size=args.encode_batch, dtype=args.dtype)
    settings.validate()
    process = _process(args.cpu)
    summary = prepare(args.data, args.base_model, _encoder_path(args), args.output, settings,
                      base_config=args.base_config, process=process, progress=not args.no_progress)
    rate = f", {summary['photos_per_second']} photos/s" if summary["photos_per_second"] else ""
    print(f"prepare rank {process.index}: {summary['photos']} photos encoded in {summary['seconds']} s{rate}, "
          f"{summary['already_done']} of {summary['shards']} shards already done")
    if process.index == 0:
        print(f"prepared {summary['identities']} identities ({summary['photos_total']} photos), {summary['skipped']}; "
              f"index in {os.path.join(args.output, 'index.json')}")
    return 0


def cmd_preoptimize(args) -> int:
    from hdb_core.plots import save_loss_png
    from hdb_core.training.runtime import loss_curve, state_dir
    from hdb_core.training.stage0 import PreoptimizeSettings, loss_log_path, preoptimize

    settings = PreoptimizeSettings(
        trigger=args.trigger, prompt=args.prompt, steps=args.steps, learning_rate=args.lr,
        lr_schedule=args.lr_schedule, decay_to_start=args.decay_to_start, repeats=args.repeats,
        prior_weight=args.prior_weight, class_prompt=args.class_prompt, batch_size=args.batch_size,
        resolution=args.resolution, seed=args.seed, a=args.a, b=args.b,
        rank=args.rank, lidb_seed=args.lidb_seed, text_encoder=not args.no_text_encoder, flip=not args.no_flip,
        face_check=args.face_check, min_size=args.min_size, checkpoint_every=args.checkpoint_every,
        dtype=args.dtype, autocast=args.autocast, gradient_checkpointing=args.gradient_checkpointing)
    settings.validate()
    process = _process(args.cpu)
    summary = preoptimize(args.data, args.base_model, args.output, settings, base_config=args.base_config,
                          process=process, progress=not args.no_progress)
    csv_path = loss_log_path(args.output, process.index)
    save_loss_png(loss_curve(csv_path), "stage 0: mean loss per step", csv_path[: -len(".csv")] + ".png")
    print(f"rank {process.index}: {summary['trained']} LiDBs trained, {summary['already_done']} already done, "
          f"{summary['skipped']}; loss log in {state_dir(args.output)}")
    return 0


def cmd_train_hypernet(args) -> int:
    from accelerate import Accelerator

    from hdb_core.training.prepared import is_prepared
    from hdb_core.training.stage1 import HypernetSettings, train_hypernet

    settings = HypernetSettings(
        trigger=args.trigger, prompt=args.prompt, steps=args.steps, batch_size=args.batch_size,
        learning_rate=args.lr, warmup_steps=args.warmup_steps, alpha=args.alpha,
        beta=stage1_beta(args.beta, args.subspace_components > 0), subspace_components=args.subspace_components,
        weight_space=args.weight_space, weight_length=args.weight_length,
        diffusion_photo=args.diffusion_photo, input_photos=args.input_photos, grad_clip=args.grad_clip,
        prior_weight=args.prior_weight, class_prompt=args.class_prompt,
        resolution=args.resolution, width=args.width,
        depth=args.depth, heads=args.heads, iterations=args.iterations, seed=args.seed, flip=not args.no_flip,
        face_check=args.face_check, min_size=args.min_size, checkpoint_every=args.checkpoint_every,
        dtype=args.dtype, autocast=args.autocast, gradient_checkpointing=args.gradient_checkpointing,
        ema_decay=args.ema_decay, val_identities=args.val_identities, workers=args.workers)
    settings.validate()
    # With prepared data an encoder is only checked against the features' (and only when given).
    encoder = args.image_encoder if is_prepared(args.data) else _encoder_path(args)
    accelerator = Accelerator(cpu=bool(args.cpu))
    summary = train_hypernet(args.data, args.lidbs, args.base_model, encoder, args.output, settings,
                             base_config=args.base_config, accelerator=accelerator, progress=not args.no_progress)
    if accelerator.is_main_process:
        ema = f", EMA weights in {summary['ema_output']}" if summary["ema_output"] else ""
        print(f"stage 1: {summary['identities']} identities trained on, {summary['held_out']} held out, "
              f"{summary['skipped']}, {settings.steps} steps in {summary['seconds'] / 60:.1f} min; hypernetwork in "
              f"{args.output}{ema}; loss.csv, validation.csv and loss.png in {summary['state_dir']}")
    return 0


def _forward(args, names) -> list[str]:
    """Parsed options as command-line tokens again (to hand them to a sub-command)."""
    out = []
    for name in names:
        value = getattr(args, name)
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            out += [flag] if value else []
        elif value is not None:
            out += [flag, str(value)]
    return out


def cmd_pipeline(args) -> int:
    """prepare -> preoptimize -> train-hypernet into one run folder, every process waiting for the others."""
    run = args.output
    prepared, lidbs = os.path.join(run, "prepared"), os.path.join(run, "lidbs")
    hypernet = os.path.join(run, "hypernet.safetensors")
    common = ["--base-model", args.base_model, *_forward(args, ("base_config", "cpu", "no_progress"))]
    data = ["--resolution", str(args.resolution), "--face-check", args.face_check, "--min-size", str(args.min_size)]
    run_args = _forward(args, [n for n in _option_names(_run_args, _gpu_args) if n not in ("cpu", "no_progress")])
    steps = [
        ["prepare", "--data", args.data, "--output", prepared, "--image-encoder", _encoder_path(args), *common, *data,
         *_forward(args, _option_names(_prepare_args)), "--dtype", args.dtype],
        ["preoptimize", "--data", prepared, "--output", lidbs, *common, *data, *run_args,
         "--steps", str(args.stage0_steps), "--lr", str(args.stage0_lr), "--batch-size", str(args.stage0_batch_size),
         "--lr-schedule", args.stage0_lr_schedule, "--decay-to-start", str(args.stage0_decay_to_start),
         "--repeats", str(args.stage0_repeats), *_forward(args, _option_names(_prior_args))],
        ["train-hypernet", "--data", prepared, "--lidbs", lidbs, "--output", hypernet, *common, *data, *run_args,
         "--steps", str(args.stage1_steps), "--lr", str(args.stage1_lr), "--batch-size", str(args.stage1_batch_size),
         "--checkpoint-every", str(args.checkpoint_every),
         *_forward(args, _option_names(_stage1_args, _prior_args))],
    ]
    process = _process(args.cpu)
    started = time.time()
    for argv in steps:
        sub_args = build_parser().parse_args(argv)
        COMMANDS[sub_args.command](sub_args)
        process.wait()      # stage 1 needs every LiDB, stage 0 every shard
    if process.index == 0:
        from hdb_core.training.stage1 import ema_path

        # a subspace hypernetwork's own subspace, to finetune its predictions within; else that of every LiDB
        source = ["--hypernet", hypernet] if args.subspace_components else ["--lidbs", lidbs]
        COMMANDS["fit-subspace"](build_parser().parse_args(["fit-subspace", *source, "--output",
                                                            subspace_path(hypernet)]))
        validation = os.path.join(run, "hypernet.state", "validation.csv")
        files = [f for f in (ema_path(hypernet), hypernet) if os.path.exists(f)]
        advice = f", whichever has the lower held-out loss in {validation}" if os.path.exists(validation) else ""
        print(f"pipeline: done in {(time.time() - started) / 60:.1f} min; hypernetwork: {' or '.join(files)}{advice}")
    return 0


def _load_photos(paths: list[str], size: int, face_check: str):
    import torch

    from hdb_core.training import data

    images = []
    for p in paths:
        if not os.path.isfile(p):
            raise HDBError(f"Photo '{p}' does not exist; give the path of a face image.")
        try:
            images.append(data.prepare_image(p, size, face_check))
        except ValueError as e:
            raise HDBError(f"Photo '{p}' cannot be used ({e}); use a clear frontal face photo"
                           f"{' or --face-check none' if face_check != 'none' else ''}.") from None
    return torch.stack(images)


def cmd_predict(args) -> int:
    import torch

    from hdb_core.lidb.file import save_lidb
    from hdb_core.hypernet.file import load_hypernet
    from hdb_core.hypernet.image_encoder import ClipImageEncoder
    from hdb_core.lidb.lora_export import save_kohya

    device = _device(args.cpu)
    net = load_hypernet(args.hypernet, device=device)
    if not os.path.exists(args.image_encoder):
        raise HDBError(f"Image encoder '{args.image_encoder}' does not exist; pass the local CLIP vision folder the "
                       f"hypernetwork was trained with.")
    encoder = ClipImageEncoder.from_pretrained(args.image_encoder, device=device)
    net.encoder.check(encoder.spec, "image encoder")
    images = _load_photos(args.image, 512, args.face_check)
    trigger = args.trigger or net.info.get("trigger") or defaults.TRIGGER
    with torch.no_grad():
        lidb = net.predict_lidb(encoder.encode(images), args.iterations, trigger=trigger, base_model=net.base_model)
    save_lidb(lidb, args.output)
    if args.lora:
        save_kohya(lidb, args.lora)
    print(f"LiDB written to {args.output}" + (f", LoRA to {args.lora}" if args.lora else ""))
    return 0


def stage1_beta(typed: float | None, subspace_network: bool) -> float:
    """The beta typed, else the table's: the subspace hypernetwork learns from the diffusion term alone."""
    return typed if typed is not None else defaults.SUBSPACE_STAGE1_BETA if subspace_network else defaults.STAGE1_BETA


def finetune_lr(typed: float | None, in_subspace: bool) -> float:
    """The rate typed, else the table's: a subspace's coefficients take another scale than train matrices."""
    return typed if typed is not None else defaults.SUBSPACE_LR if in_subspace else defaults.FINETUNE_LR


def cmd_finetune(args) -> int:
    import torch
    from tqdm.auto import tqdm

    from hdb_core.lidb.file import load_lidb, save_lidb
    from hdb_core.lidb.lora_export import save_kohya
    from hdb_core.lidb.subspace import load_subspace
    from hdb_core.lidb.targets import check_layers_match
    from hdb_core.training.base_model import load_base_model, photo_latents, tokenize
    from hdb_core.training.finetune import FinetuneSettings, diffusers_loss_fn, finetune, zero_start
    from hdb_core.training.objective import check_prior

    check_prior(args.prior_weight, args.class_prompt)
    device = _device(args.cpu)
    base = load_base_model(args.base_model, args.base_config).to(device)
    subspace = load_subspace(args.subspace) if args.subspace else None
    if args.init:
        start = load_lidb(args.init)
        check_layers_match(start.layers, base.layers(True), f"The start LiDB '{args.init}'")
    elif subspace is not None:
        check_layers_match(subspace.layers, base.layers(True), f"The identity subspace '{args.subspace}'")
        start = subspace.lidb(subspace.mean)
    else:
        start = zero_start(base.layers(True), args.rank, torch.Generator().manual_seed(args.seed), args.relaxation)
    trigger = args.trigger or start.info.get("trigger") or defaults.TRIGGER
    log.info("training with the trigger phrase %r", trigger)
    images = _load_photos(args.image, args.resolution, args.face_check)
    latents = photo_latents(base, images, device, mirror=not args.no_flip)
    input_ids = tokenize(base, [args.prompt.format(trigger=trigger)], device)
    injector = base.injector(start.layers, f"The start LiDB '{args.init}'" if args.init else "This LiDB")
    settings = FinetuneSettings(steps=args.steps, learning_rate=finetune_lr(args.lr, subspace is not None),
                                draws_per_step=args.draws, relaxed_rank=args.rank, relaxation=args.relaxation,
                                seed=args.seed, device=device,
                                subspace=subspace)
    with injector, tqdm(total=args.steps, desc="finetune", unit="step", disable=args.no_progress) as bar:
        loss_fn = diffusers_loss_fn(base, injector, latents, input_ids, mirror=not args.no_flip,
                                    prior_ids=tokenize(base, [args.class_prompt], device),
                                    prior_weight=args.prior_weight)
        result = finetune(start, loss_fn, settings, progress=lambda s, n, loss: (bar.update(1),
                                                                                 bar.set_postfix(loss=f"{loss:.4f}")),
                          source="finetuned", trigger=trigger, base_model=base.name)
    save_lidb(result.lidb, args.output)
    if args.lora:
        save_kohya(result.lidb, args.lora)
    print(f"finetuned LiDB (rank {result.lidb.config.rank}) written to {args.output}")
    return 0


def subspace_path(hypernet: str) -> str:
    """Where `hdb pipeline` writes the identity subspace: beside the hypernetwork, listed with it in ComfyUI."""
    return hypernet.removesuffix(".safetensors") + ".subspace.safetensors"


def cmd_fit_subspace(args) -> int:
    from hdb_core.hypernet.file import load_hypernet
    from hdb_core.hypernet.subspace_model import SubspaceHyperNetwork
    from hdb_core.lidb.subspace import fit_folder, save_subspace

    if args.hypernet:
        net = load_hypernet(args.hypernet)
        if not isinstance(net, SubspaceHyperNetwork):
            raise HDBError(f"'{args.hypernet}' is a transformer hypernetwork, which predicts outside any subspace; "
                           f"fit a subspace to its stage-0 LiDBs with --lidbs instead.")
        save_subspace(net.subspace(), args.output)
        print(f"the identity subspace of {args.hypernet} ({net.config.components} directions), written to "
              f"{args.output}")
        return 0
    subspace = fit_folder(args.lidbs, args.components)
    save_subspace(subspace, args.output)
    print(f"identity subspace of {subspace.info['identities']} LiDBs: {subspace.components} directions holding "
          f"{subspace.info['variance']:.0%} of their variance, written to {args.output}")
    return 0


def cmd_export_lora(args) -> int:
    import torch

    from hdb_core.lidb.file import load_lidb
    from hdb_core.lidb.lora_export import save_kohya

    lidb = load_lidb(args.lidb)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    save_kohya(lidb, args.output, dtype)
    print(f"LoRA written to {args.output} ({len(lidb.layers)} layers, rank {lidb.config.rank})")
    return 0


# -- helpers -------------------------------------------------------------------------------------
def _process(cpu: bool):
    from hdb_core.training.runtime import ProcessInfo

    return ProcessInfo.from_accelerate(cpu)


def _device(cpu: bool):
    import torch

    return torch.device("cuda" if torch.cuda.is_available() and not cpu else "cpu")


COMMANDS = {"pipeline": cmd_pipeline, "prepare": cmd_prepare, "preoptimize": cmd_preoptimize,
            "train-hypernet": cmd_train_hypernet, "predict": cmd_predict, "finetune": cmd_finetune,
            "fit-subspace": cmd_fit_subspace, "export-lora": cmd_export_lora}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")   # never reach for the hub at run time
    try:
        return COMMANDS[args.command](args)
    except HDBError as e:
        print(f"hdb {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
