"""HDB_LoadHyperNet and HDB_PredictLiDBWeights inside a real ComfyUI: graphs, model management, bad input."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import hdb_core
from hdb_core.lidb.weights import clear_aux_cache

from devtools.comfy_runtime import call_node, run_prompt

TINY_ENCODER = dict(hidden_size=32, num_tokens=17, image_size=56, name="tiny CLIP vision (dev)")


@pytest.fixture(scope="module")
def vision_nodes(comfy):
    return comfy["nodes"].NODE_CLASS_MAPPINGS["HDBDev_TinyClipVision"]


@pytest.fixture(scope="module")
def hypernet_dir(comfy):
    from folder_paths import get_folder_paths

    path = get_folder_paths("hyperdreambooth")[0]
    os.makedirs(path, exist_ok=True)
    return path


def tiny_layers(comfy, tiny_sd):
    ct = comfy["pack"].nodes.comfy_targets
    model, clip, _ = tiny_sd
    return [t.spec for t in ct.unet_targets(model).values()] + [t.spec for t in ct.clip_targets(clip).values()]


def write_hypernet(path, layers, seed=0, iterations=3, hidden_size=32, base_model="SD1.5 (tiny dev)"):
    torch.manual_seed(seed)
    encoder = hdb_core.EncoderSpec(**{**TINY_ENCODER, "hidden_size": hidden_size})
    with torch.inference_mode(False):
        net = hdb_core.HyperNetwork(hdb_core.HyperNetConfig(width=32, depth=1, heads=2, iterations=iterations),
                                    layers, hdb_core.LiDBConfig(), encoder)
        net.base_model = base_model
        hdb_core.save_hypernet(net, path, {"trigger": "sks"})
    return path


@pytest.fixture(scope="module")
def tiny_hypernet(comfy, tiny_sd, hypernet_dir):
    write_hypernet(os.path.join(hypernet_dir, "tiny_sd15.safetensors"), tiny_layers(comfy, tiny_sd))
    return "tiny_sd15.safetensors"


@pytest.fixture(scope="module")
def face_png(comfy):
    from PIL import Image
    from skimage.data import astronaut

    import folder_paths

    name = "hdb_astronaut.png"
    Image.fromarray(astronaut()[::4, ::4]).save(os.path.join(folder_paths.get_input_directory(), name))
    return name


def face_tensor(n=1):
    from skimage.data import astronaut

    img = torch.from_numpy(np.ascontiguousarray(astronaut()[::4, ::4])).float() / 255.0
    return img.unsqueeze(0).repeat(n, 1, 1, 1)


def predict(node, hypernet_name, clip_vision, image, iterations=0):
    (hn,) = call_node(node("HDB_LoadHyperNet"), hypernet_name=hypernet_name)
    (lidb,) = call_node(node("HDB_PredictLiDBWeights"), hypernet=hn, clip_vision=clip_vision, image=image,
                        iterations=iterations)
    return hn, lidb


def test_graph_predict_apply_sample(comfy, vision_nodes, tiny_hypernet, face_png, tiny_sd):
    prompt = {
        "ckpt": {"class_type": "HDBDev_TinyCheckpoint", "inputs": {"scale": "tiny", "seed": 0, "v_prediction": False}},
        "vision": {"class_type": "HDBDev_TinyClipVision", "inputs": {"seed": 0}},
        "hn": {"class_type": "HDB_LoadHyperNet", "inputs": {"hypernet_name": tiny_hypernet}},
        "img": {"class_type": "LoadImage", "inputs": {"image": face_png}},
        "pred": {"class_type": "HDB_PredictLiDBWeights",
                 "inputs": {"hypernet": ["hn", 0], "clip_vision": ["vision", 0], "image": ["img", 0], "iterations": 0}},
        "apply": {"class_type": "HDB_ApplyLiDB", "inputs": {"model": ["ckpt", 0], "clip": ["ckpt", 1],
                                                             "lidb": ["pred", 0], "strength_model": 1.0,
                                                             "strength_clip": 1.0}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    }
    for tag, (model, clip) in {"id": (["apply", 0], ["apply", 1]), "base": (["ckpt", 0], ["ckpt", 1])}.items():
        prompt[f"pos_{tag}"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of sks face", "clip": clip}}
        prompt[f"neg_{tag}"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": clip}}
        prompt[f"ks_{tag}"] = {"class_type": "KSampler", "inputs": {
            "model": model, "positive": [f"pos_{tag}", 0], "negative": [f"neg_{tag}", 0],
            "latent_image": ["latent", 0], "seed": 0, "steps": 2, "cfg": 2.0, "sampler_name": "euler",
            "scheduler": "normal", "denoise": 1.0}}
        prompt[f"dec_{tag}"] = {"class_type": "VAEDecode", "inputs": {"samples": [f"ks_{tag}", 0], "vae": ["ckpt", 2]}}
        prompt[f"out_{tag}"] = {"class_type": "PreviewImage", "inputs": {"images": [f"dec_{tag}", 0]}}
    result = run_prompt(prompt)
    assert result.success, result.error
    (lidb,) = result.node_output("pred")
    assert isinstance(lidb, hdb_core.LiDB) and lidb.info["source"] == "predicted"
    assert lidb.info["base_model"] == "SD1.5 (tiny dev)" and lidb.info["trigger"] == "sks"
    assert {s.name for s in lidb.layers} == {s.name for s in tiny_layers(comfy, tiny_sd)}
    assert not lidb.a_train[lidb.layers[0].name].is_inference()  # usable as a training start
    with_id, base = result.node_output("ks_id")[0]["samples"], result.node_output("ks_base")[0]["samples"]
    assert torch.isfinite(with_id).all() and not torch.allclose(with_id, base, atol=1e-6)


def test_iterations_zero_means_the_files_default_and_hypernet_is_managed(comfy, node, vision_nodes, tiny_hypernet):
    import comfy.model_management as mm

    (clip_vision,) = call_node(vision_nodes, seed=0)
    hn, default = predict(node, tiny_hypernet, clip_vision, face_tensor())
    assert hn.model.config.iterations == 3
    assert hn in mm.loaded_models()  # loaded through ComfyUI's model management
    _, explicit = predict(node, tiny_hypernet, clip_vision, face_tensor(), iterations=3)
    _, one = predict(node, tiny_hypernet, clip_vision, face_tensor(), iterations=1)
    name = default.layers[0].name
    assert torch.equal(default.a_train[name], explicit.a_train[name])
    assert not torch.allclose(default.a_train[name], one.a_train[name])


def test_several_photos_give_one_identity(comfy, node, vision_nodes, tiny_hypernet):
    (clip_vision,) = call_node(vision_nodes, seed=0)
    _, single = predict(node, tiny_hypernet, clip_vision, face_tensor(1))
    _, repeated = predict(node, tiny_hypernet, clip_vision, face_tensor(3))
    flipped_batch = torch.cat([face_tensor(1), face_tensor(1).flip(2)])
    _, two = predict(node, tiny_hypernet, clip_vision, flipped_batch)
    name = single.layers[-1].name
    torch.testing.assert_close(single.b_train[name], repeated.b_train[name], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(single.b_train[name], two.b_train[name], atol=1e-5)


def finetune_prompt(hypernet_name, face_png):
    prompt = {
        "ckpt": {"class_type": "HDBDev_TinyCheckpoint", "inputs": {"scale": "tiny", "seed": 0, "v_prediction": False}},
        "vision": {"class_type": "HDBDev_TinyClipVision", "inputs": {"seed": 0}},
        "hn": {"class_type": "HDB_LoadHyperNet", "inputs": {"hypernet_name": hypernet_name}},
        "img": {"class_type": "LoadImage", "inputs": {"image": face_png}},
        "pred": {"class_type": "HDB_PredictLiDBWeights",
                 "inputs": {"hypernet": ["hn", 0], "clip_vision": ["vision", 0], "image": ["img", 0], "iterations": 0}},
        "ft": {"class_type": "HDB_FastFinetune", "inputs": {
            "model": ["ckpt", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2], "image": ["img", 0],
            "init_lidb": ["pred", 0], "trigger": "sks face", "steps": 2, "learning_rate": 1e-3, "relaxed_rank": 2,
            "train_text_encoder": True, "resolution": 64, "seed": 0}},
        "save": {"class_type": "HDB_SaveLiDB",
                 "inputs": {"lidb": ["ft", 0], "filename_prefix": "hdb_test/predicted_ft"}},
    }
    return prompt


def _requires_fast_finetune(comfy):
    if "HDB_FastFinetune" not in comfy["nodes"].NODE_CLASS_MAPPINGS:
        pytest.skip("HDB_FastFinetune is not registered yet")


def test_predicted_lidb_starts_fast_finetune(comfy, vision_nodes, tiny_hypernet, face_png):
    _requires_fast_finetune(comfy)
    result = run_prompt(finetune_prompt(tiny_hypernet, face_png))
    assert result.success, result.error
    (pred,), (tuned, _) = result.node_output("pred"), result.node_output("ft")
    assert tuned.info["source"] == "finetuned" and tuned.is_finite() and tuned.config.rank == 2
    assert [s.name for s in tuned.layers] == [s.name for s in pred.layers]
    name = pred.layers[0].name
    # Relaxation keeps the prediction as the first component; two steps then move it.
    assert not torch.equal(tuned.delta(name), pred.delta(name))


def test_apply_then_finetune_in_one_session(comfy, node, vision_nodes, tiny_hypernet, tiny_sd):
    """Aux bases cached under inference mode (by ApplyLiDB) must still serve a later finetune's backward."""
    _requires_fast_finetune(comfy)
    clear_aux_cache()
    (clip_vision,) = call_node(vision_nodes, seed=0)
    _, lidb = predict(node, tiny_hypernet, clip_vision, face_tensor())
    model, clip, vae = tiny_sd
    call_node(node("HDB_ApplyLiDB"), model=model, clip=clip, lidb=lidb, strength_model=1.0, strength_clip=1.0)
    tuned, _ = call_node(node("HDB_FastFinetune"), model=model, clip=clip, vae=vae, image=face_tensor(),
                         init_lidb=lidb, trigger="sks face", steps=1, learning_rate=1e-3, relaxed_rank=2,
                         train_text_encoder=True, resolution=64, seed=0)
    assert tuned.is_finite() and tuned.info["trigger"] == "sks face"
    assert any(not torch.allclose(tuned.delta(s.name), lidb.delta(s.name)) for s in lidb.layers), \
        "the finetune step changed nothing"


# -- bad input ----------------------------------------------------------------------------------------

def _one_sentence(msg: str) -> bool:
    return "\n" not in msg and msg.endswith(".")


def test_empty_folder_says_what_file_goes_where(comfy, node, tmp_path, monkeypatch):
    import folder_paths

    hdb_errors = hdb_core.errors
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "hyperdreambooth",
                        ([str(tmp_path)], {".safetensors"}))
    with pytest.raises(hdb_errors.HDBError) as e:
        call_node(node("HDB_LoadHyperNet"), hypernet_name="missing.safetensors")
    msg = str(e.value)
    assert "hypernetwork" in msg and str(tmp_path) in msg and ".safetensors" in msg and _one_sentence(msg)


def test_lidb_file_in_hypernet_folder_is_explained(comfy, node, hypernet_dir, tiny_sd):
    path = os.path.join(hypernet_dir, "an_identity.safetensors")
    with torch.inference_mode(False):
        hdb_core.save_lidb(hdb_core.LiDB.zeros(tiny_layers(comfy, tiny_sd), hdb_core.LiDBConfig()), path)
    with pytest.raises(hdb_core.HDBError, match="is a LiDB") as e:
        call_node(node("HDB_LoadHyperNet"), hypernet_name="an_identity.safetensors")
    assert _one_sentence(str(e.value))


def test_clip_vision_of_another_size_is_refused(comfy, node, tiny_hypernet):
    from devtools import tiny_vision

    wide = tiny_vision.comfy_clip_vision(seed=0, hidden_size=48, intermediate_size=96)
    with pytest.raises(hdb_core.HDBError) as e:
        predict(node, tiny_hypernet, wide, face_tensor())
    msg = str(e.value)
    assert "hidden size 48" in msg and "hidden size 32" in msg and "Load CLIP Vision" in msg and _one_sentence(msg)


def test_not_a_clip_vision_is_refused(comfy, node, tiny_hypernet, tiny_sd):
    with pytest.raises(hdb_core.HDBError, match="not a CLIP vision model"):
        predict(node, tiny_hypernet, tiny_sd[2], face_tensor())


def test_empty_image_batch_is_refused(comfy, node, vision_nodes, tiny_hypernet):
    (clip_vision,) = call_node(vision_nodes, seed=0)
    with pytest.raises(hdb_core.HDBError, match="empty") as e:
        predict(node, tiny_hypernet, clip_vision, torch.zeros(0, 64, 64, 3))
    assert _one_sentence(str(e.value))


def test_sdxl_hypernet_with_sd15_model_is_explained(comfy, node, vision_nodes, hypernet_dir, tiny_sd):
    from devtools.arch_targets import sdxl_targets

    layers = [hdb_core.LayerSpec(s.name, s.in_features, s.out_features) for s in sdxl_targets()]
    write_hypernet(os.path.join(hypernet_dir, "sdxl.safetensors"), layers, base_model="SDXL 1.0")
    (clip_vision,) = call_node(vision_nodes, seed=0)
    _, lidb = predict(node, "sdxl.safetensors", clip_vision, face_tensor())
    model, clip, _ = tiny_sd
    with pytest.raises(hdb_core.HDBError) as e:
        call_node(node("HDB_ApplyLiDB"), model=model, clip=clip, lidb=lidb, strength_model=1.0, strength_clip=1.0)
    msg = str(e.value)
    assert "SDXL UNet" in msg and "SDXL 1.0" in msg and "connected model has" in msg and _one_sentence(msg)


def test_a_subspace_hypernetwork_predicts_through_the_same_nodes(comfy, node, vision_nodes, tiny_sd, hypernet_dir):
    """The subspace hypernetwork (hdb train-hypernet --subspace-components) loads and predicts like the transformer,
    and its prediction lies in its subspace: the mean stage-0 LiDB plus a move along its directions."""
    from hdb_core.hypernet.subspace_model import SubspaceHyperNetwork, SubspaceNetConfig
    from hdb_core.lidb.subspace import IdentitySubspace, rows_of

    layers = tiny_layers(comfy, tiny_sd)
    g = torch.Generator().manual_seed(0)
    zero = hdb_core.LiDB.zeros(layers, hdb_core.LiDBConfig())
    lidbs = [hdb_core.LiDB(layers, zero.config, {n: torch.randn(v.shape, generator=g) for n, v in zero.a_train.items()},
                           {n: torch.randn(v.shape, generator=g) for n, v in zero.b_train.items()}, {})
             for _ in range(5)]
    subspace = IdentitySubspace.fit(lidbs, 3)
    with torch.inference_mode(False):
        net = SubspaceHyperNetwork(SubspaceNetConfig(3), layers, zero.config, hdb_core.EncoderSpec(**TINY_ENCODER))
        net.set_subspace(subspace)
        with torch.no_grad():
            net.coordinates.weight.normal_(0, 0.05, generator=g)
        hdb_core.save_hypernet(net, os.path.join(hypernet_dir, "tiny_subspace.safetensors"), {"trigger": "sks"})
    (clip_vision,) = call_node(vision_nodes, seed=0)
    hn, single = predict(node, "tiny_subspace.safetensors", clip_vision, face_tensor())
    assert isinstance(hn.model, SubspaceHyperNetwork) and single.info["trigger"] == "sks"
    offset = rows_of([single])[0] - subspace.mean
    basis = subspace.directions / subspace.directions.norm(dim=1, keepdim=True)
    assert offset.norm() > 0 and (offset - basis.T @ (basis @ offset)).norm() < 1e-4 * offset.norm()
    _, repeated = predict(node, "tiny_subspace.safetensors", clip_vision, face_tensor(3))
    torch.testing.assert_close(rows_of([repeated]), rows_of([single]), atol=1e-5, rtol=1e-5)
