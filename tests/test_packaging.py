"""Packaging: registry metadata, ComfyUI-Manager's view of the pack, and a Manager-style install.

The install test proves that a copy of the repository's files as a clone or a
registry zip holds them (git's tracked and not-ignored files; no symlink back to
this checkout, no .venv, no .comfyui, no caches) placed in a fresh ComfyUI base's custom_nodes/ is
imported by the real server (`main.py --cpu`) without an import failure, and that
/object_info then lists every node of node_list.json with a tooltip on every input.
Its venv sees the ComfyUI environment's site-packages through a .pth file and
`pip install --no-index -r requirements.txt` must succeed there: the requirements
parse, resolve against ComfyUI's installed packages without forcing an upgrade or
downgrade, and `pip check` finds no conflict. It does not prove the extra packages
download from PyPI onto a bare ComfyUI (scripts/setup.sh does that on a new machine).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(name: str) -> str:
    with open(os.path.join(REPO, name), encoding="utf-8") as f:
        return f.read()


def _requirement_lines(name="requirements.txt") -> list[str]:
    return [ln.strip() for ln in _read(name).splitlines() if ln.strip() and not ln.strip().startswith("#")]


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads(_read("pyproject.toml"))


def test_requirements_are_manager_friendly():
    lines = _requirement_lines()
    for line in lines:
        # Manager runs `pip install <line>` per line: no inline comments, no options, one valid specifier.
        assert "#" not in line and not line.startswith("-"), line
        Requirement(line)
    names = {Requirement(ln).name.lower() for ln in lines}
    assert not names & {"torch", "torchvision", "torchaudio"}, "ComfyUI brings torch; never list it"
    assert not names & {"insightface", "onnxruntime", "onnxruntime-gpu"}


def test_pyproject_metadata(pyproject):
    project, comfy = pyproject["project"], pyproject["tool"]["comfy"]
    assert project["name"] == "comfyui-hyperdreambooth"
    import hdb_core

    assert project["version"] == hdb_core.__version__
    assert project["requires-python"] == ">=3.10"
    assert project["urls"]["Repository"].startswith("https://")
    assert project["scripts"]["hdb"] == "hdb_core.cli:main"
    assert [str(Requirement(d)) for d in project["dependencies"]] == \
        [str(Requirement(d)) for d in _requirement_lines()], "keep pyproject dependencies == requirements.txt"
    assert comfy["PublisherId"] and comfy["DisplayName"] == "HyperDreamBooth"
    assert comfy["Icon"].startswith("https://") and comfy["requires-comfyui"] == ">=0.3.75"
    assert pyproject["tool"]["setuptools"]["packages"]["find"]["include"] == ["hdb_core", "hdb_core.*"]
    assert project["license"] == "GPL-3.0-only" and "GNU GENERAL PUBLIC LICENSE" in _read("LICENSE")
    assert "Version 3, 29 June 2007" in _read("LICENSE")
    # The icon the registry shows is a file of this repository.
    assert os.path.isfile(os.path.join(REPO, comfy["Icon"].split("/main/", 1)[1]))


def test_comfyui_reads_the_pyproject(comfy):
    """ComfyUI's own parser (comfy_config, used by the registry tooling) understands the file."""
    from comfy_config import config_parser

    cfg = config_parser.extract_node_configuration(REPO)
    assert cfg.project.name == "comfyui-hyperdreambooth"
    assert cfg.project.supported_comfyui_version == ">=0.3.75"
    assert cfg.tool_comfy.publisher_id and cfg.tool_comfy.display_name == "HyperDreamBooth"
    assert cfg.project.license.text == "GPL-3.0-only"


def test_node_list_json_lists_every_node(comfy):
    """Manager's scanner cannot see V3 node ids; node_list.json must name exactly the registered nodes."""
    listed = json.loads(_read("node_list.json"))
    registered = {n for n in comfy["hdb_nodes"] if not n.startswith("HDBDev_")}
    assert set(listed) == registered, "run: .venv/bin/python scripts/update_node_list.py"
    assert all(isinstance(v, str) and v for v in listed.values())


def test_wheel_holds_only_the_core(tmp_path):
    """`pip install .` gives the plain-torch core and the `hdb` command, never the ComfyUI wrappers."""
    from devtools.comfy_server import copy_pack

    src = copy_pack(str(tmp_path / "src"))  # setuptools writes build/ and *.egg-info beside the sources
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "--disable-pip-version-check", src, "-w", str(tmp_path)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    import zipfile

    import hdb_core

    (wheel,) = tmp_path.glob(f"comfyui_hyperdreambooth-{hdb_core.__version__}-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"hdb_core/lidb/weights.py", "hdb_core/training/objective.py", "hdb_core/face_detect.py"} <= set(names)
    assert not [n for n in names if n.startswith(("nodes/", "devtools/", "tests/"))]
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert re.search(r"^hdb = hdb_core\.cli:main$", entry, re.M)


@pytest.mark.server
def test_manager_style_install_boots_the_real_server(tmp_path):
    from devtools.comfy_server import PACK_DIR_NAME, ComfyServer, install_like_manager

    python, base, pip_log = install_like_manager(str(tmp_path))
    assert "Successfully installed" not in pip_log, f"requirements forced changes on ComfyUI's env:\n{pip_log}"
    check = subprocess.run([python, "-m", "pip", "check", "--disable-pip-version-check"],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    pack = os.path.join(base, "custom_nodes", PACK_DIR_NAME)
    assert not os.path.islink(pack) and os.path.isfile(os.path.join(pack, "__init__.py"))

    with ComfyServer(python, base, str(tmp_path / "server.log")) as server:
        info = server.get_json("/object_info")
        log = server.log()

    ours = [ln for ln in log.splitlines() if ln.rstrip().endswith(pack)]
    assert ours, f"the pack was not loaded:\n{log[-3000:]}"
    assert not [ln for ln in ours if "IMPORT FAILED" in ln], log[-3000:]
    assert f"Cannot import {pack}" not in log and "Error while calling comfy_entrypoint" not in log

    expected = set(json.loads(_read("node_list.json")))
    served = {k for k in info if k.startswith("HDB")}
    assert served == expected
    for node_id in expected:
        node = info[node_id]
        assert node["category"].startswith("HyperDreamBooth")
        for section in ("required", "optional"):
            for name, spec in node["input"].get(section, {}).items():
                opts = spec[1] if len(spec) > 1 else {}
                assert opts.get("tooltip"), f"{node_id}.{name} has no tooltip"
