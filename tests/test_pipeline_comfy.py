"""The whole pipeline into ComfyUI: `hdb pipeline` (prepare -> stage 0 -> stage 1 -> identity subspace), then
its EMA hypernetwork file is loaded by HDB_LoadHyperNet and predicts an identity that HDB_ApplyLiDB patches
into a model sampled by KSampler, and HDB_FastFinetune refines within the pipeline's identity subspace."""
from __future__ import annotations

import os
import shutil

import torch

import hdb_core

from devtools.comfy_runtime import run_prompt
from hdb_core import cli, defaults

from tests.pipeline_fixtures import FAST, FAST_NET, make_faces


def test_stage0_stage1_hypernet_predicts_in_a_comfy_graph(comfy, tiny_model, tmp_path):
    from devtools import tiny_vision
    import folder_paths

    # The transformers twin of the graph's HDBDev_TinyClipVision(seed=0): stage 1 sees the features ComfyUI will.
    encoder_dir = str(tmp_path / "encoder")
    tiny_vision.transformers_twin(tiny_vision.comfy_clip_vision(0)).save_pretrained(encoder_dir)

    faces = make_faces(str(tmp_path / "faces"), 3)
    run = str(tmp_path / "run")
    assert cli.main(["pipeline", "--data", faces, "--base-model", tiny_model, "--image-encoder", encoder_dir,
                     "--output", run, "--stage0-steps", "2", "--stage1-steps", "2", "--stage1-batch-size", "2",
                     *FAST, *FAST_NET]) == 0
    out = os.path.join(folder_paths.get_folder_paths("hyperdreambooth")[0], "pipeline_tiny.safetensors")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    shutil.copy(os.path.join(run, "hypernet.ema.safetensors"), out)
    shutil.copy(os.path.join(run, "hypernet.subspace.safetensors"),
                out.replace(".safetensors", ".subspace.safetensors"))

    from PIL import Image

    Image.open(os.path.join(faces, "id01.png")).save(os.path.join(folder_paths.get_input_directory(), "id01.png"))
    prompt = {
        "ckpt": {"class_type": "HDBDev_TinyCheckpoint", "inputs": {"scale": "tiny", "seed": 0, "v_prediction": False}},
        "vision": {"class_type": "HDBDev_TinyClipVision", "inputs": {"seed": 0}},
        "hn": {"class_type": "HDB_LoadHyperNet", "inputs": {"hypernet_name": "pipeline_tiny.safetensors"}},
        "img": {"class_type": "LoadImage", "inputs": {"image": "id01.png"}},
        "pred": {"class_type": "HDB_PredictLiDBWeights",
                 "inputs": {"hypernet": ["hn", 0], "clip_vision": ["vision", 0], "image": ["img", 0], "iterations": 0}},
        "apply": {"class_type": "HDB_ApplyLiDB", "inputs": {"model": ["ckpt", 0], "clip": ["ckpt", 1],
                                                             "lidb": ["pred", 0], "strength_model": 1.0,
                                                             "strength_clip": 1.0}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of sks face", "clip": ["apply", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["apply", 1]}},
        "ks": {"class_type": "KSampler", "inputs": {
            "model": ["apply", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
            "seed": 0, "steps": 2, "cfg": 2.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "dec": {"class_type": "VAEDecode", "inputs": {"samples": ["ks", 0], "vae": ["ckpt", 2]}},
        "out": {"class_type": "PreviewImage", "inputs": {"images": ["dec", 0]}},
        "ft": {"class_type": "HDB_FastFinetune", "inputs": {
            "model": ["ckpt", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2], "image": ["img", 0],
            "init_lidb": ["pred", 0], "trigger": defaults.TRIGGER, "steps": 3,
            "learning_rate": defaults.FINETUNE_LR, "relaxed_rank": 4, "train_text_encoder": True, "resolution": 64,
            "seed": 0, "identity_subspace": "pipeline_tiny.subspace.safetensors"}},
        "curve": {"class_type": "PreviewImage", "inputs": {"images": ["ft", 1]}},
    }
    result = run_prompt(prompt)
    assert result.success, result.error
    (lidb,) = result.node_output("pred")
    trained = hdb_core.load_hypernet(out)
    assert (lidb.layers == trained.layers and lidb.info["trigger"] == defaults.TRIGGER
            and lidb.info["base_model"] == "model")
    assert lidb.is_finite() and any(t.abs().sum() > 0 for t in lidb.b_train.values())
    assert torch.isfinite(result.node_output("ks")[0]["samples"]).all()

    # Three identities' stage-0 LiDBs span two directions; the finetune moved the prediction within them only.
    from hdb_core.lidb.subspace import load_subspace, rows_of

    subspace = load_subspace(os.path.join(run, "hypernet.subspace.safetensors"))
    assert subspace.components == 2 and subspace.layers == trained.layers
    finetuned = result.node_output("ft")[0]
    assert finetuned.config.rank == 1 and not finetuned.free_down and finetuned.info["source"] == "finetuned"
    moved = (rows_of([finetuned])[0] - rows_of([lidb])[0]).double()
    assert moved.norm() > 0
    coefficients = torch.linalg.lstsq(subspace.directions.double().T, moved[:, None]).solution
    assert (subspace.directions.double().T @ coefficients)[:, 0].sub(moved).norm() < 1e-4 * moved.norm()
