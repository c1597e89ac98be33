"""One table of defaults (hdb_core/defaults.py), read by the node, the CLI, the workflows and README,
and one trigger story: what a template trains is what it prompts with."""
from __future__ import annotations

import glob
import json
import os
import re

import pytest
import torch

from hdb_core import cli, defaults
from hdb_core.lidb.weights import LiDB, LiDBConfig
from hdb_core.training.stage0 import PreoptimizeSettings
from hdb_core.training.stage1 import HypernetSettings

from devtools import comfy_runtime
from devtools.comfy_runtime import REPO

FINETUNE_NODE_DEFAULTS = {"trigger": defaults.TRIGGER, "steps": defaults.FINETUNE_STEPS,
                          "learning_rate": defaults.FINETUNE_LR, "relaxed_rank": defaults.RELAXED_RANK,
                          "resolution": defaults.RESOLUTION, "mirror": defaults.MIRROR,
                          "relaxation": defaults.RELAXATION, "draws_per_step": defaults.FINETUNE_DRAWS,
                          "prior_weight": defaults.PRIOR_WEIGHT, "class_prompt": defaults.CLASS_PROMPT}


def _subparser(name):
    parser = cli.build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices[name]


def test_the_node_uses_the_table(node):
    info = node("HDB_FastFinetune").INPUT_TYPES()
    inputs = {**info["required"], **info.get("optional", {})}
    got = {name: inputs[name][1]["default"] for name in FINETUNE_NODE_DEFAULTS}
    assert got == FINETUNE_NODE_DEFAULTS


def test_the_cli_uses_the_table():
    finetune = _subparser("finetune").parse_args(["--image", "x", "--output", "y", "--base-model", "z"])
    assert (finetune.steps, cli.finetune_lr(finetune.lr, False), finetune.rank, finetune.resolution,
            not finetune.no_flip, finetune.relaxation) == (defaults.FINETUNE_STEPS, defaults.FINETUNE_LR,
                                                           defaults.RELAXED_RANK, defaults.RESOLUTION,
                                                           defaults.MIRROR, defaults.RELAXATION)
    assert cli.finetune_lr(finetune.lr, True) == defaults.SUBSPACE_LR and cli.finetune_lr(0.5, True) == 0.5
    assert finetune.draws == defaults.FINETUNE_DRAWS
    assert (finetune.prior_weight, finetune.class_prompt) == (defaults.PRIOR_WEIGHT, defaults.CLASS_PROMPT)
    fit = _subparser("fit-subspace").parse_args(["--lidbs", "l", "--output", "o"])
    assert fit.components == defaults.SUBSPACE_COMPONENTS
    assert finetune.trigger is None, "hdb finetune takes the --init LiDB's trigger, else defaults.TRIGGER"
    stage0 = _subparser("preoptimize").parse_args(["--data", "d", "--output", "o", "--base-model", "m"])
    assert (stage0.trigger, stage0.steps, stage0.lr, stage0.resolution, not stage0.no_flip, stage0.lr_schedule,
            stage0.decay_to_start, stage0.repeats) == (
        defaults.TRIGGER, defaults.STAGE0_STEPS, defaults.STAGE0_LR, defaults.RESOLUTION, defaults.MIRROR,
        defaults.STAGE0_LR_SCHEDULE, defaults.STAGE0_DECAY_TO_START, defaults.STAGE0_REPEATS)
    pipeline = _subparser("pipeline").parse_args(["--data", "d", "--output", "o", "--base-model", "m"])
    assert (pipeline.stage0_lr_schedule, pipeline.stage0_decay_to_start, pipeline.stage0_repeats) == (
        defaults.STAGE0_LR_SCHEDULE, defaults.STAGE0_DECAY_TO_START, defaults.STAGE0_REPEATS)
    assert stage0.prior_weight == pipeline.prior_weight == defaults.STAGE_PRIOR_WEIGHT != defaults.PRIOR_WEIGHT
    stage1 = _subparser("train-hypernet").parse_args(["--data", "d", "--lidbs", "l", "--output", "o.safetensors",
                                                      "--base-model", "m"])
    assert (stage1.trigger, stage1.steps, stage1.lr) == (defaults.TRIGGER, defaults.STAGE1_STEPS, defaults.STAGE1_LR)
    assert (stage1.prior_weight, stage1.class_prompt) == (defaults.STAGE_PRIOR_WEIGHT, defaults.CLASS_PROMPT)
    assert PreoptimizeSettings().prior_weight == HypernetSettings().prior_weight == defaults.STAGE_PRIOR_WEIGHT
    assert stage1.subspace_components == 0, "the paper's transformer unless asked"
    assert cli.stage1_beta(stage1.beta, False) == defaults.STAGE1_BETA
    assert cli.stage1_beta(stage1.beta, True) == defaults.SUBSPACE_STAGE1_BETA and cli.stage1_beta(2.0, True) == 2.0


def test_readme_states_the_table():
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    rows = dict(re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", readme, re.M))
    for name in ("TRIGGER", "FINETUNE_STEPS", "ZERO_START_STEPS", "FINETUNE_LR", "FINETUNE_DRAWS", "RELAXED_RANK",
                 "RELAXATION", "SUBSPACE_COMPONENTS", "SUBSPACE_LR", "STAGE1_BETA", "SUBSPACE_STAGE1_BETA", "MIRROR",
                 "RESOLUTION", "PRIOR_WEIGHT", "STAGE_PRIOR_WEIGHT", "CLASS_PROMPT"):
        assert rows.get(name) == str(getattr(defaults, name)), f"README's defaults table is stale for {name}"


def _api_workflows():
    files = sorted(glob.glob(os.path.join(REPO, "workflows", "api", "*.json")))
    assert files, "no shipped workflows found"
    return [(os.path.basename(f), json.load(open(f, encoding="utf-8"))) for f in files]


@pytest.mark.parametrize("name,graph", _api_workflows())
def test_every_shipped_workflow_prompts_with_the_identifier_it_trains(name, graph):
    trained = [n["inputs"].get("trigger", defaults.TRIGGER) for n in graph.values()
               if n["class_type"] == "HDB_FastFinetune"]
    # A template that loads a saved identity expects one trained with the default trigger (README says so).
    identifiers = trained or [defaults.TRIGGER]
    prompts = [n["inputs"]["text"] for n in graph.values()
               if n["class_type"] == "CLIPTextEncode" and n.get("_meta", {}).get("title", "") == "Prompt"]
    assert prompts, f"{name}: no sampling prompt found"
    for prompt in prompts:
        assert all(ident in prompt for ident in identifiers), f"{name}: {prompt!r} lacks {identifiers}"


def _start(tiny_sd, comfy, trigger):
    ct = comfy["pack"].nodes.comfy_targets
    model, clip, _ = tiny_sd
    specs = [t.spec for t in ct.unet_targets(model).values()] + [t.spec for t in ct.clip_targets(clip).values()]
    return LiDB.zeros(specs, LiDBConfig(), trigger=trigger, source="predicted")


@pytest.mark.parametrize("typed,expected", [(defaults.TRIGGER, "a zqx face"), ("", "a zqx face"),
                                            ("a person called kwz", "a person called kwz")])
def test_fast_finetune_keeps_the_init_lidbs_trigger_unless_another_is_typed(comfy, node, tiny_sd, typed,
                                                                             expected):
    model, clip, vae = tiny_sd
    photo = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    lidb, _ = comfy_runtime.call_node(node("HDB_FastFinetune"), model=model, clip=clip, vae=vae, image=photo,
                                      init_lidb=_start(tiny_sd, comfy, "a zqx face"), trigger=typed, steps=1,
                                      resolution=64, relaxed_rank=1)
    assert lidb.info["trigger"] == expected


def test_load_lidb_shows_the_trigger(comfy, node, tiny_sd, tmp_path):
    import folder_paths

    path = os.path.join(folder_paths.get_folder_paths("lidb")[0], "shows_trigger.safetensors")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    from hdb_core import save_lidb

    save_lidb(_start(tiny_sd, comfy, "a zqx face"), path)
    out = node("HDB_LoadLiDB").execute(lidb_name="shows_trigger.safetensors")
    assert "trigger: a zqx face" in out.ui["text"][0]
