"""Graphs people build around Fast Finetune, with stock nodes: sampling-time patches upstream,
and phone-sized photos."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from devtools.comfy_runtime import run_prompt


@pytest.fixture(scope="module")
def photo_name(comfy):
    import folder_paths

    g = np.random.default_rng(0)
    small = (g.random((6, 5, 3)) * 255).astype(np.uint8)
    Image.fromarray(small).resize((80, 96), Image.BICUBIC).save(
        os.path.join(folder_paths.get_input_directory(), "conditions_face.png"))
    return "conditions_face.png"


def _graph(photo_name, patch: dict | None):
    g = {
        "ckpt": {"class_type": "HDBDev_TinyCheckpoint", "inputs": {"scale": "tiny", "seed": 0, "v_prediction": False}},
        "img": {"class_type": "LoadImage", "inputs": {"image": photo_name}},
        "ft": {"class_type": "HDB_FastFinetune", "inputs": {
            "model": ["patch", 0] if patch else ["ckpt", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2],
            "image": ["img", 0], "trigger": "a ohwx face", "steps": 3, "learning_rate": 1e-2, "relaxed_rank": 2,
            "train_text_encoder": True, "resolution": 64, "seed": 0}},
        "loss": {"class_type": "PreviewImage", "inputs": {"images": ["ft", 1]}},
    }
    if patch:
        g["patch"] = {"class_type": patch["class_type"], "inputs": {"model": ["ckpt", 0], **patch["inputs"]}}
    return g


def _lidb(result):
    assert result.success, result.error
    return result.node_output("ft")[0]


@pytest.mark.parametrize("patch", [
    {"class_type": "FreeU_V2", "inputs": {"b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2}},   # in-place output patch
    {"class_type": "TomePatchModel", "inputs": {"ratio": 0.5}},                         # random token merging
    {"class_type": "PatchModelAddDownscale", "inputs": {                                # Deep Shrink
        "block_number": 1, "downscale_factor": 2.0, "start_percent": 0.0, "end_percent": 1.0,
        "downscale_after_skip": True, "downscale_method": "bicubic", "upscale_method": "bicubic"}},
], ids=lambda p: p["class_type"])
def test_sampling_time_patches_upstream_leave_training_unchanged(comfy, photo_name, patch):
    plain = _lidb(run_prompt(_graph(photo_name, None)))
    patched = _lidb(run_prompt(_graph(photo_name, patch)))
    for spec in plain.layers:
        assert torch.equal(plain.a_train[spec.name], patched.a_train[spec.name])
        assert torch.equal(plain.b_train[spec.name], patched.b_train[spec.name])


def test_a_phone_sized_photo_is_shrunk_with_antialiasing(comfy):
    """A 3000 x 2000 zone plate at 512 px: the rings that no 512 px image can hold average out to grey."""
    photo_input = comfy["pack"].nodes.photo_input
    h, w = 2000, 3000
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                          indexing="ij")
    r2 = (x - w / 2) ** 2 + (y - h / 2) ** 2
    plate = (0.5 + 0.5 * torch.cos(np.pi * r2 / 2400.0)).float()                  # frequency grows with radius
    image = plate[None, :, :, None].expand(1, h, w, 3).contiguous()
    out = photo_input.prepare_pixels(image, 512)[0, ..., 0]
    reference = torch.nn.functional.interpolate(plate[None, None, :, 500:2500], size=(512, 512), mode="area")[0, 0]
    yy, xx = torch.meshgrid(torch.arange(512.0), torch.arange(512.0), indexing="ij")
    radius = ((xx - 256) ** 2 + (yy - 256) ** 2).sqrt()
    ring = (radius > 200) & (radius < 250)      # 1.3-1.6 cycles per output pixel: far above Nyquist
    assert out[ring].std() < 0.05, "aliasing: high-frequency rings survive as moiré"
    assert (out - reference).abs()[ring].mean() < 0.05


def test_tiny_models_read_comfyui_where_comfyui_path_says(tmp_path, monkeypatch):
    """One rule for where ComfyUI is (COMFYUI_PATH, else .comfyui/), used by every dev tool."""
    import shutil

    from devtools import comfy_runtime, tiny_diffusers

    tokenizer_files = os.path.join(comfy_runtime.comfy_path(), "comfy", "sd1_tokenizer")
    other = tmp_path / "MyComfyUI"
    (other / "comfy").mkdir(parents=True)
    (other / "main.py").write_text("")
    monkeypatch.setenv("COMFYUI_PATH", str(other))
    with pytest.raises(OSError, match="MyComfyUI"):
        tiny_diffusers.build("tiny")
    shutil.copytree(tokenizer_files, other / "comfy" / "sd1_tokenizer")
    assert tiny_diffusers.build("tiny")[3]("a ohwx face").input_ids[0] == 49406


@pytest.mark.parametrize("family,clip_skip,expected", [
    ("sd15", None, set()),                      # the last layer's output is the conditioning
    ("sd15", -2, {"te"}),                        # Set CLIP Last Layer -2: the last layer is unused
    ("sd2", None, {"te"}),                       # SD2 reads the penultimate layer
    ("sdxl", None, {"te1"}),                     # CLIP-L penultimate; bigG's pooled output uses every layer
])
def test_text_encoder_layers_the_clip_never_uses_are_not_trained(comfy, family, clip_skip, expected):
    from devtools import tiny_models

    ct = comfy["pack"].nodes.comfy_targets
    clip = tiny_models.comfy_clip("tiny") if family == "sd15" else tiny_models.comfy_clip_of(family)
    if clip_skip is not None:
        clip.clip_layer(clip_skip)
    unused = ct.unused_clip_layers(clip)
    last = {c: max(int(n.split(".layers.")[1].split(".")[0]) for n in ct.clip_targets(clip) if n.startswith(c + "."))
            for c in expected}
    assert {n.split(".")[0] for n in unused} == expected
    for name in unused:
        assert f".layers.{last[name.split('.')[0]]}." in name, "only the layers after the one read are unused"
    assert len(unused) == 4 * len(expected)      # q, k, v, out of one layer per affected encoder


def test_clip_skip_upstream_leaves_the_unused_layer_out_of_the_identity(comfy, photo_name):
    graph = _graph(photo_name, None)
    graph["skip"] = {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["ckpt", 1], "stop_at_clip_layer": -2}}
    graph["ft"]["inputs"]["clip"] = ["skip", 0]
    lidb = _lidb(run_prompt(graph))
    te = [s.name for s in lidb.layers if s.component == "te"]
    assert te and not [n for n in te if ".layers.1." in n], "the last of the tiny CLIP's 2 layers is unused"
    assert [n for n in te if ".layers.0." in n]


def test_save_lidb_shows_the_name_load_lidb_lists(comfy, node, tiny_sd):
    import folder_paths

    from hdb_core.lidb.weights import LiDB, LiDBConfig

    ct = comfy["pack"].nodes.comfy_targets
    model, clip, _ = tiny_sd
    specs = [t.spec for t in ct.unet_targets(model).values()]
    out = node("HDB_SaveLiDB").execute(lidb=LiDB.zeros(specs, LiDBConfig()), filename_prefix="faces/anna")
    (shown,) = out.ui["text"]
    assert shown in folder_paths.get_filename_list("lidb"), shown
    assert node("HDB_LoadLiDB").execute(lidb_name=shown).result[0].layers == tuple(specs)


def test_sdxl_end_to_end_both_text_encoders_apply_and_export(comfy, node, caplog):
    """SDXL (tiny, ComfyUI's real SDXL classes): finetune trains the UNet and both CLIPs, Apply LiDB
    patches them, and the exported LoRA loads in the stock LoraLoader with no key left out and the
    same weights."""
    import logging

    import nodes as comfy_nodes
    from comfy.lora import calculate_weight

    from devtools import comfy_runtime, tiny_models

    model, clip, vae = tiny_models.comfy_checkpoint_of("sdxl", "tiny")
    photo = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    lidb, _ = comfy_runtime.call_node(node("HDB_FastFinetune"), model=model, clip=clip, vae=vae, image=photo,
                                      steps=2, resolution=64, learning_rate=1e-2)
    assert {s.component for s in lidb.layers} == {"unet", "te1", "te2"}
    assert lidb.is_finite() and any(lidb.b_train[s.name].abs().sum() > 0 for s in lidb.layers if s.component == "te2")
    comfy_runtime.call_node(node("HDB_ExportLoRA"), lidb=lidb, filename_prefix="sdxl/e2e")
    name = max(n for n in comfy["folder_paths"].get_filename_list("loras") if n.startswith("hyperdreambooth/sdxl/e2e"))
    with caplog.at_level(logging.WARNING):
        lora_model, lora_clip = comfy_nodes.LoraLoader().load_lora(model, clip, name, 1.0, 1.0)
    assert "lora key not loaded" not in caplog.text
    ours_model, ours_clip = comfy_runtime.call_node(node("HDB_ApplyLiDB"), model=model, clip=clip, lidb=lidb,
                                                    strength_model=1.0, strength_clip=1.0)
    for theirs, ours, base in ((lora_model, ours_model, model), (lora_clip.patcher, ours_clip.patcher, clip.patcher)):
        assert set(theirs.patches) == set(ours.patches) and ours.patches
        weights = base.model.state_dict()
        for key in ours.patches:
            w = weights[key].float()
            torch.testing.assert_close(calculate_weight(theirs.patches[key], w.clone(), key),
                                       calculate_weight(ours.patches[key], w.clone(), key), atol=1e-6, rtol=1e-5)
