"""Example workflows: UI files (templates) and their API twins describe the same graphs, and the twins run."""
import glob
import json
import os

import pytest

from devtools import comfy_runtime, demo, workflows

UI_FILES = sorted(glob.glob(os.path.join(workflows.WORKFLOW_DIR, "*.json")))
WIDGET_KINDS = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def ui_to_api(ui: dict, mappings: dict) -> dict:
    """Read a LiteGraph workflow the way the frontend turns it into a prompt (written independently of the builder)."""
    links = {l[0]: l for l in ui["links"]}
    api = {}
    for n in ui["nodes"]:
        cls = mappings[n["type"]]
        inputs = {i["name"]: [str(links[i["link"]][1]), links[i["link"]][2]]
                  for i in n.get("inputs", []) if i.get("link") is not None}
        values = iter(n.get("widgets_values", []))
        info = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, spec in info.get(section, {}).items():
                kind = spec[0]
                if name in inputs or not (isinstance(kind, list) or kind in WIDGET_KINDS):
                    continue
                inputs[name] = next(values)
                if len(spec) > 1 and spec[1].get("control_after_generate"):
                    assert next(values) in ("fixed", "increment", "decrement", "randomize")
        assert next(values, None) is None, f"node {n['id']} has more widget values than widgets"
        api[str(n["id"])] = {"class_type": n["type"], "inputs": inputs}
    return api


def test_four_templates_with_thumbnails_and_no_api_files_among_them():
    assert [os.path.basename(p)[:2] for p in UI_FILES] == ["1_", "2_", "3_", "4_"]
    for path in UI_FILES:
        ui = json.load(open(path))
        assert {"nodes", "links", "version"} <= set(ui), f"{path} is not in the UI format"
        assert os.path.isfile(path[:-5] + ".jpg")


@pytest.mark.parametrize("path", UI_FILES, ids=os.path.basename)
def test_ui_file_and_api_twin_describe_the_same_graph(comfy, path):
    twin = json.load(open(os.path.join(workflows.API_DIR, os.path.basename(path))))
    parsed = ui_to_api(json.load(open(path)), comfy["nodes"].NODE_CLASS_MAPPINGS)
    assert parsed == {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in twin.items()}


def test_files_are_up_to_date_with_the_registered_nodes(comfy, tmp_path):
    """A node gained an input or a default changed: rerun scripts/build_workflows.py."""
    workflows.build(comfy["nodes"].NODE_CLASS_MAPPINGS, str(tmp_path))
    for path in glob.glob(os.path.join(tmp_path, "**", "*.json"), recursive=True):
        committed = os.path.join(workflows.WORKFLOW_DIR, os.path.relpath(path, tmp_path))
        assert json.load(open(path)) == json.load(open(committed)), committed


def test_every_public_node_appears_in_an_example(comfy):
    used = {n["type"] for p in UI_FILES for n in json.load(open(p))["nodes"]}
    assert set(comfy["hdb_nodes"]) <= used


def test_api_twins_run_end_to_end_on_tiny_stand_ins(comfy):
    demo.prepare_stand_ins(comfy)
    fp = comfy["folder_paths"]
    for name in ("1_photo_to_identity_with_hypernet", "2_photo_to_identity_no_hypernet",
                 "3_reuse_identity_with_style_lora", "4_flux_photo_to_identity"):
        result = comfy_runtime.run_prompt(demo.fast_settings(demo.load_api(name), finetune_steps=3))
        assert result.success, (name, result.error)
    lidbs = fp.get_filename_list("lidb")
    assert workflows.LIDB in lidbs and "identity_00002_.safetensors" in lidbs
    assert any(n.startswith("hyperdreambooth/identity_") for n in fp.get_filename_list("loras"))
    images = os.listdir(fp.get_output_directory())
    assert any(n.startswith("identity_flux_") for n in lidbs)
    for prefix in ("hyperdreambooth_0", "hyperdreambooth_loss_", "hyperdreambooth_reuse_", "hyperdreambooth_flux_0",
                   "hyperdreambooth_flux_loss_"):
        assert any(f.startswith(prefix) for f in images), prefix
