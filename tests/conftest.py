"""Shared fixtures: a real ComfyUI booted in-process on the CPU, and tiny SD models.

ComfyUI comes from COMFYUI_PATH or from .comfyui/ (scripts/setup.sh provisions it).
Models/output live in a per-session temp folder, so tests never touch a user's setup.
"""
from __future__ import annotations

import hashlib
import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

pytest_plugins = ("tests.pipeline_fixtures",)   # the tiny diffusers model fixtures

# One intra-op thread: tests use tiny models (overhead-bound) and some start worker processes,
# which would oversubscribe the two cores of a CI machine.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """{'pack', 'nodes', 'execution', 'folder_paths', 'hdb_nodes', 'base'} of a booted ComfyUI."""
    from devtools import comfy_runtime

    return comfy_runtime.boot(str(tmp_path_factory.mktemp("comfy_base")))


@pytest.fixture(scope="session")
def node(comfy):
    """node('HDB_ApplyLiDB') -> the registered node class."""
    return lambda node_id: comfy["nodes"].NODE_CLASS_MAPPINGS[node_id]


@pytest.fixture(scope="session")
def tiny_sd(comfy):
    """(MODEL, CLIP, VAE) of a tiny SD1.5-architecture checkpoint; tests must not mutate them."""
    from devtools import tiny_models

    return tiny_models.comfy_checkpoint("tiny", seed=0)


def weights_hash(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.fixture
def hash_weights():
    return weights_hash


def pytest_terminal_summary(terminalreporter):
    """One closing line naming what was skipped for want of a browser, and the command that enables it."""
    browser = [r for r in terminalreporter.stats.get("skipped", []) if "install_browser" in str(r.longrepr)]
    if browser:
        terminalreporter.write_line(f"{len(browser)} browser tests skipped (no Chromium here): run "
                                    f"scripts/install_browser.sh, then scripts/test.sh again, to run them.")
