"""Apply / Load / Save / Export nodes on a real ComfyUI with a tiny SD1.5-architecture checkpoint."""
import logging
import os

import pytest
import torch

import hdb_core

from devtools import comfy_runtime, tiny_models
from devtools.comfy_runtime import patched_state


def tiny_lidb(comfy, model, clip, seed=0, rank=1, scale=0.05, free_rank=0):
    """A random LiDB for the connected model's architecture; with free_rank, the paper's relaxed kind."""
    ct = comfy["pack"].nodes.comfy_targets
    specs = [t.spec for t in ct.unet_targets(model).values()] + [t.spec for t in ct.clip_targets(clip).values()]
    g = torch.Generator().manual_seed(seed)
    lidb = hdb_core.LiDB.zeros(specs, hdb_core.LiDBConfig(rank=rank, seed=11), trigger="a sks face", source="random")
    lidb = lidb.with_tensors({k: torch.randn(v.shape, generator=g) * scale for k, v in lidb.a_train.items()},
                             {k: torch.randn(v.shape, generator=g) * scale for k, v in lidb.b_train.items()})
    if free_rank:
        free = ({s.name: torch.randn(free_rank, s.in_features, generator=g) * scale for s in specs},
                {s.name: torch.randn(s.out_features, free_rank, generator=g) * scale for s in specs})
        lidb = lidb.with_tensors(lidb.a_train, lidb.b_train, free=free)
    return lidb


def unet_output(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 77, 32, generator=g)
    model.patch_model()
    try:
        with torch.inference_mode():
            return model.model.apply_model(x, torch.tensor([500.0]), c_crossattn=ctx).clone()
    finally:
        model.unpatch_model()


def test_apply_changes_each_target_by_strength_up_down(comfy, node, tiny_sd):
    model, clip, _ = tiny_sd
    lidb = tiny_lidb(comfy, model, clip)
    ct = comfy["pack"].nodes.comfy_targets
    new_model, new_clip = comfy_runtime.call_node(node("HDB_ApplyLiDB"), model=model, clip=clip, lidb=lidb,
                                                  strength_model=0.7, strength_clip=-1.3)
    base_unet, base_clip = patched_state(model), patched_state(clip.patcher)
    got_unet, got_clip = patched_state(new_model), patched_state(new_clip.patcher)
    checked = 0
    for targets, base, got, strength in ((ct.unet_targets(model), base_unet, got_unet, 0.7),
                                         (ct.clip_targets(clip), base_clip, got_clip, -1.3)):
        for name, t in targets.items():
            down, up = lidb.down_up(name)
            torch.testing.assert_close(got[t.key] - base[t.key], strength * up @ down, atol=2e-6, rtol=1e-4)
            checked += 1
        untouched = set(base) - {t.key for t in targets.values()}
        assert all(torch.equal(base[k], got[k]) for k in untouched)
    assert checked == len(lidb.layers) == 64


def test_strength_zero_is_bit_identical_and_inputs_never_mutate(comfy, node, tiny_sd, hash_weights):
    model, clip, _ = tiny_sd
    before = (hash_weights(model.model), hash_weights(clip.cond_stage_model))
    base_out = unet_output(model)
    lidb = tiny_lidb(comfy, model, clip)
    m0, c0 = comfy_runtime.call_node(node("HDB_ApplyLiDB"), model=model, clip=clip, lidb=lidb,
                                     strength_model=0.0, strength_clip=0.0)
    assert torch.equal(unet_output(m0), base_out)
    m1, _ = comfy_runtime.call_node(node("HDB_ApplyLiDB"), model=model, clip=clip, lidb=lidb,
                                    strength_model=1.0, strength_clip=1.0)
    assert not torch.equal(unet_output(m1), base_out)
    assert torch.equal(unet_output(model), base_out), "the input MODEL must stay unpatched"
    comfy_runtime.call_node(node("HDB_SaveLiDB"), lidb=lidb, filename_prefix="mutation_check")
    comfy_runtime.call_node(node("HDB_ExportLoRA"), lidb=lidb, filename_prefix="mutation_check")
    assert (hash_weights(model.model), hash_weights(clip.cond_stage_model)) == before
    assert not model.patches and not clip.patcher.patches


@pytest.mark.parametrize("free_rank", [0, 3], ids=["aux_subspace", "free_lora"])
def test_export_loads_in_stock_loraloader_with_same_weights(comfy, node, tiny_sd, caplog, free_rank):
    import nodes as comfy_nodes

    model, clip, _ = tiny_sd
    lidb = tiny_lidb(comfy, model, clip, seed=3, rank=2, free_rank=free_rank)
    comfy_runtime.call_node(node("HDB_ExportLoRA"), lidb=lidb, filename_prefix="faces/anna")
    listed = comfy["folder_paths"].get_filename_list("loras")
    name = max(n for n in listed if n.startswith("hyperdreambooth/faces/anna_"))
    with caplog.at_level(logging.WARNING):
        lora_model, lora_clip = comfy_nodes.LoraLoader().load_lora(model, clip, name, 0.8, 0.6)
    assert "lora key not loaded" not in caplog.text
    ours_model, ours_clip = comfy_runtime.call_node(node("HDB_ApplyLiDB"), model=model, clip=clip, lidb=lidb,
                                                    strength_model=0.8, strength_clip=0.6)
    for a, b in ((lora_model, ours_model), (lora_clip.patcher, ours_clip.patcher)):
        sa, sb = patched_state(a), patched_state(b)
        assert sa.keys() == sb.keys()
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("free_rank", [0, 2], ids=["aux_subspace", "free_lora"])
def test_save_then_load_round_trips_bit_exactly(comfy, node, tiny_sd, free_rank):
    model, clip, _ = tiny_sd
    lidb = tiny_lidb(comfy, model, clip, seed=5, free_rank=free_rank)
    comfy_runtime.call_node(node("HDB_SaveLiDB"), lidb=lidb, filename_prefix=f"people/bob{free_rank}")
    comfy_runtime.call_node(node("HDB_SaveLiDB"), lidb=lidb, filename_prefix=f"people/bob{free_rank}")
    listed = [n for n in comfy["folder_paths"].get_filename_list("lidb") if n.startswith(f"people/bob{free_rank}_")]
    assert listed == [f"people/bob{free_rank}_00001_.safetensors", f"people/bob{free_rank}_00002_.safetensors"]
    (back,) = comfy_runtime.call_node(node("HDB_LoadLiDB"), lidb_name=listed[-1])
    assert back.layers == lidb.layers and back.info == lidb.info
    assert back.relaxation == lidb.relaxation and back.free_rank == free_rank
    for k in lidb.a_train:
        assert torch.equal(back.a_train[k], lidb.a_train[k]) and torch.equal(back.b_train[k], lidb.b_train[k])
        if free_rank:
            assert torch.equal(back.free_down[k], lidb.free_down[k]) and torch.equal(back.free_up[k], lidb.free_up[k])
    out_dir = os.path.join(comfy["folder_paths"].get_output_directory(), "lidb", "people")
    assert sorted(n for n in os.listdir(out_dir) if n.startswith(f"bob{free_rank}_")) == [
        f"bob{free_rank}_00001_.safetensors", f"bob{free_rank}_00002_.safetensors"]
    size = os.path.getsize(os.path.join(out_dir, listed[0].split("/")[1]))
    # float32 numbers plus a compact header (SD1.5's exact size is checked in test_lidb_core)
    assert lidb.num_trainable * 4 < size < lidb.num_trainable * 4 + 200 * len(lidb.layers)


def _graph(lidb_name, strength=1.0, prefix="ok"):
    return {
        "1": {"class_type": "HDBDev_TinyCheckpoint", "inputs": {"scale": "tiny", "seed": 0, "v_prediction": False}},
        "2": {"class_type": "HDB_LoadLiDB", "inputs": {"lidb_name": lidb_name}},
        "3": {"class_type": "HDB_ApplyLiDB", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lidb": ["2", 0],
                                                        "strength_model": strength, "strength_clip": strength}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a sks face", "clip": ["3", 1]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["3", 1]}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {"model": ["3", 0], "positive": ["4", 0], "negative": ["5", 0],
                                                   "latent_image": ["6", 0], "seed": 1, "steps": 2, "cfg": 2.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": prefix}},
    }


@pytest.fixture(scope="module")
def lidb_files(comfy, tiny_sd):
    """A good LiDB, a corrupt one and one for another architecture, in models/lidb."""
    folder = os.path.join(comfy["folder_paths"].models_dir, "lidb")
    os.makedirs(folder, exist_ok=True)
    model, clip, _ = tiny_sd
    hdb_core.save_lidb(tiny_lidb(comfy, model, clip), os.path.join(folder, "good.safetensors"))
    mid_model = tiny_models.comfy_model("mid")
    other = tiny_lidb(comfy, mid_model, tiny_models.comfy_clip("mid"))
    hdb_core.save_lidb(other.with_info(base_model="mid test model"), os.path.join(folder, "mid.safetensors"))
    data = open(os.path.join(folder, "good.safetensors"), "rb").read()
    open(os.path.join(folder, "corrupt.safetensors"), "wb").write(data[:300])
    return folder


def test_graph_load_apply_sample_runs_and_lidb_changes_the_image(comfy, lidb_files):
    with_id = comfy_runtime.run_prompt(_graph("good.safetensors", 1.0, "with"))
    without = comfy_runtime.run_prompt(_graph("good.safetensors", 0.0, "without"))
    assert with_id.success and without.success, (with_id.error, without.error)
    img = lambda r: r.node_output("8")[0]  # noqa: E731
    assert img(with_id).shape == (1, 64, 64, 3) and not torch.equal(img(with_id), img(without))


@pytest.mark.parametrize("graph_change, expect", [
    ({"2": {"lidb_name": "missing.safetensors"}}, "was not found in"),
    ({"2": {"lidb_name": "corrupt.safetensors"}}, "truncated or corrupt"),
    ({"2": {"lidb_name": "mid.safetensors"}}, "This LiDB was made for a custom UNet"),
])
def test_bad_lidb_inputs_fail_the_node_and_comfyui_keeps_serving(comfy, lidb_files, graph_change, expect):
    graph = _graph("good.safetensors")
    for nid, inputs in graph_change.items():
        graph[nid]["inputs"].update(inputs)
    bad = comfy_runtime.run_prompt(graph)
    assert not bad.success and expect in bad.error["exception_message"], bad.error
    assert bad.error["exception_message"].strip().endswith(".")
    assert comfy_runtime.run_prompt(_graph("good.safetensors", 1.0, "after_error")).success


@pytest.mark.parametrize("prefix, expect", [
    ("../escape", "'..'"), ("/etc/evil", "absolute path"), ("C:/evil", "absolute path"), ("", "empty"),
    ("a/../../b", "'..'"),
])
def test_save_and_export_refuse_prefixes_that_escape(comfy, node, tiny_sd, tmp_path, prefix, expect):
    lidb = tiny_lidb(comfy, *tiny_sd[:2])
    out = comfy["folder_paths"].get_output_directory()
    before = sorted(os.walk(os.path.dirname(out)))
    for node_id in ("HDB_SaveLiDB", "HDB_ExportLoRA"):
        with pytest.raises(hdb_core.HDBError, match=expect):
            comfy_runtime.call_node(node(node_id), lidb=lidb, filename_prefix=prefix)
    assert sorted(os.walk(os.path.dirname(out))) == before


def test_empty_lidb_folder_error_says_where_files_go(comfy, node, monkeypatch):
    fp = comfy["folder_paths"]
    monkeypatch.setitem(fp.folder_names_and_paths, "lidb",
                        ([str(os.path.join(comfy["base"], "empty_lidb"))], {".safetensors"}))
    fp.filename_list_cache.pop("lidb", None)
    with pytest.raises(ValueError, match="No LiDB files found: put a .safetensors LiDB file in .*empty_lidb"):
        comfy_runtime.call_node(node("HDB_LoadLiDB"), lidb_name="")
    fp.filename_list_cache.pop("lidb", None)
