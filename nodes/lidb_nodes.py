"""Nodes that apply, load, save and export LiDB weight sets."""
from __future__ import annotations

import logging
import os

import folder_paths
from comfy_api.latest import io

from hdb_core.lidb.file import load_lidb, save_lidb
from hdb_core.lidb.lora_export import save_kohya
from hdb_core.lidb.targets import DIFFUSION_COMPONENTS
from hdb_core.lidb.weights import aux_for_layers
from . import comfy_targets as ct
from .comfy_runtime import progress_bar
from .folders import LIDB_FOLDER, LORA_SUBFOLDER, lidb_output_dir, numbered_save_path, resolve_model_file
from .types import CATEGORY, LIDB

log = logging.getLogger("HyperDreamBooth")


class ApplyLiDB(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HDB_ApplyLiDB",
            display_name="Apply LiDB (HyperDreamBooth)",
            category=CATEGORY,
            description="Patch a LiDB identity into the diffusion model (UNet or DiT) and text encoder, like "
                        "LoraLoader does for a LoRA (fused q/k/v weights get one slice patch each).",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model (the base the LiDB was made for)."),
                io.Clip.Input("clip", tooltip="The CLIP text encoder of the same base model."),
                LIDB.Input("lidb", tooltip="The identity weights (from Load LiDB, Predict LiDB Weights "
                                           "or Fast Finetune)."),
                io.Float.Input("strength_model", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="How strongly the identity changes the UNet; 0 leaves it untouched."),
                io.Float.Input("strength_clip", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="How strongly the identity changes the text encoder; 0 leaves it untouched."),
            ],
            outputs=[io.Model.Output(display_name="MODEL"), io.Clip.Output(display_name="CLIP")],
        )

    @classmethod
    def execute(cls, model, clip, lidb, strength_model=1.0, strength_clip=1.0) -> io.NodeOutput:
        model_parts = {s.component for s in lidb.layers} & set(DIFFUSION_COMPONENTS)
        te_parts = {s.component for s in lidb.layers} - model_parts
        new_model, new_clip = model, clip
        aux_for_layers(lidb.config, lidb.layers, progress_bar())   # first use of an architecture: a few seconds
        if strength_model != 0 and model_parts:
            targets = ct.model_targets(model)
            ct.require_targets(targets, "model", model)
            ct.check_compatible(lidb, targets, model_parts, "model", ct.model_family(model))
            new_model = model.clone()
            patches = ct.lora_patches(lidb, targets, model_parts)
            added = new_model.add_patches(patches, strength_model)
            _check_added(patches, added, "model")
        if strength_clip != 0 and te_parts:
            if clip is None:
                raise ct.HDBError("This LiDB also adapts the text encoder but no CLIP is connected; connect the "
                                  "checkpoint's CLIP or set strength_clip to 0.")
            targets = ct.clip_targets(clip)
            ct.require_targets(targets, "CLIP")
            ct.check_compatible(lidb, targets, te_parts, "CLIP")
            new_clip = clip.clone()
            patches = ct.lora_patches(lidb, targets, te_parts)
            added = new_clip.add_patches(patches, strength_clip)
            _check_added(patches, added, "CLIP")
        return io.NodeOutput(new_model, new_clip)


def _check_added(patches: dict, added: list, what: str) -> None:
    missing = set(patches) - set(added)
    if missing:
        raise ct.HDBError(f"ComfyUI refused {len(missing)} of {len(patches)} LiDB patches on the {what} "
                          f"(first: {sorted(missing)[0]}); please report this with your model's name.")


class LoadLiDB(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HDB_LoadLiDB",
            display_name="Load LiDB (HyperDreamBooth)",
            category=CATEGORY,
            description="Load an identity saved as a LiDB .safetensors file.",
            inputs=[
                io.Combo.Input("lidb_name", options=folder_paths.get_filename_list(LIDB_FOLDER),
                               tooltip="A LiDB file from models/lidb (or output/lidb, where Save LiDB writes)."),
            ],
            outputs=[LIDB.Output(display_name="LIDB")],
        )

    @classmethod
    def execute(cls, lidb_name) -> io.NodeOutput:
        path = resolve_model_file(LIDB_FOLDER, lidb_name, "LiDB")
        lidb = load_lidb(path, progress=progress_bar())
        return io.NodeOutput(lidb, ui={"text": [describe_for_ui(lidb)]})


def describe_for_ui(lidb) -> str:
    """The line under Load LiDB: the phrase to prompt with, and what the file holds."""
    trigger = lidb.info.get("trigger") or "(none stored)"
    family = f"{lidb.info['family']}, " if lidb.info.get("family") else ""
    return (f"trigger: {trigger} | {family}rank {lidb.config.rank}, {len(lidb.layers)} layers, "
            f"{lidb.info.get('source', '?')}")


class SaveLiDB(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HDB_SaveLiDB",
            display_name="Save LiDB (HyperDreamBooth)",
            category=CATEGORY,
            description="Save an identity as a LiDB file (about 120 KB at rank 1) under output/lidb "
                        "(listed by Load LiDB).",
            is_output_node=True,
            inputs=[
                LIDB.Input("lidb", tooltip="The identity weights to save."),
                io.String.Input("filename_prefix", default="identity",
                                tooltip="File name under output/lidb; may contain subfolders (faces/anna). "
                                        "A counter is appended."),
            ],
            outputs=[],
        )

    @classmethod
    def execute(cls, lidb, filename_prefix="identity") -> io.NodeOutput:
        path, rel = numbered_save_path(lidb_output_dir(), filename_prefix)
        save_lidb(lidb, path)
        log.info("HyperDreamBooth: saved LiDB to %s (%d bytes)", path, os.path.getsize(path))
        return io.NodeOutput(ui={"text": [rel]})     # the name Load LiDB lists it under


class ExportLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HDB_ExportLoRA",
            display_name="Export LiDB as LoRA (HyperDreamBooth)",
            category=CATEGORY,
            description="Write the identity as a standard LoRA into models/loras/hyperdreambooth, usable by "
                        "LoraLoader and other tools: kohya keys for SD1.x/SD2.x/SDXL (A1111/Forge, diffusers), "
                        "diffusers/PEFT keys for DiTs (diffusers, ai-toolkit).",
            is_output_node=True,
            inputs=[
                LIDB.Input("lidb", tooltip="The identity weights to export."),
                io.String.Input("filename_prefix", default="identity",
                                tooltip="File name under models/loras/hyperdreambooth; a counter is appended."),
            ],
            outputs=[],
        )

    @classmethod
    def execute(cls, lidb, filename_prefix="identity") -> io.NodeOutput:
        base = os.path.join(folder_paths.get_folder_paths("loras")[0], LORA_SUBFOLDER)
        path, rel = numbered_save_path(base, filename_prefix)
        save_kohya(lidb, path)
        log.info("HyperDreamBooth: exported LoRA to %s", path)
        return io.NodeOutput(ui={"text": [f"{LORA_SUBFOLDER}/{rel}"]})


NODES = [ApplyLiDB, LoadLiDB, SaveLiDB, ExportLoRA]
