"""Diffusion transformers end to end in a real ComfyUI, on tiny models of ComfyUI's own classes:
Flux.1, SD3.5 (MMDiT), Flux.2, Z-Image (Lumina 2) and Qwen-Image.

One parametrised set per family: targets from ComfyUI's LoRA table (fused q/k/v as row slices),
Apply == Export + stock LoraLoader, strength 0 and no mutation, Save -> Load, a KSampler graph,
Fast Finetune (3 steps, the family's flow objective), a random hypernetwork's prediction, and
bad input (a LiDB or CLIP of another family) as one sentence.
"""
from __future__ import annotations

import logging
import os

import pytest
import torch

import hdb_core

from devtools import comfy_runtime, tiny_dits, tiny_models
from devtools.comfy_runtime import patched_state

FAMILIES = list(tiny_dits.FAMILIES)
NAMES = {"flux1": "Flux.1", "sd35": "SD3.5", "flux2": "Flux.2", "zimage": "Z-Image", "qwenimage": "Qwen-Image"}
# Target layers of the tiny configs (2 blocks of each kind).
EXPECTED_LAYERS = {
    "flux1": 2 * 8 + 2 * 4,      # double: q k v out of the image and the text stream; single: q k v proj_out
    "flux2": 2 * 8 + 2 * 4,
    "sd35": 8 + 4 + 7,           # joint blocks; block 0's second self-attention; the last has no text out
    "zimage": 4 * 4,             # 2 layers + 1 noise refiner + 1 context refiner: q k v out
    "qwenimage": 2 * 8,          # separate (unfused) q k v out of both streams
}
FUSED = {"flux1", "flux2", "sd35", "zimage"}
# Targets whose output nothing reads, so they get no gradient: the text stream ends in the last joint block
# (SD3.5: its text query; Qwen-Image: its text query and text output). They stay targets, as in other LoRAs.
DEAD_END = {"sd35": {"transformer.transformer_blocks.1.attn.add_q_proj"},
            "qwenimage": {"transformer.transformer_blocks.1.attn.add_q_proj",
                          "transformer.transformer_blocks.1.attn.to_add_out"}}
# The family's frozen LLM/T5 text encoder in the tiny checkpoints (SD3.5's is built without its T5).
FROZEN = {"flux1": "t5xxl", "flux2": "qwen3_4b", "zimage": "qwen3_4b", "qwenimage": "qwen3_4b"}
EMPTY_LATENT = {"flux2": "EmptyFlux2LatentImage"}     # the others: EmptySD3LatentImage (16 channels)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def ckpt(comfy, family):
    """(MODEL, CLIP, VAE) loaded under inference mode as the executor's loaders do; never mutated."""
    with torch.inference_mode():
        return tiny_dits.comfy_dit_checkpoint(family, "tiny", seed=0)


@pytest.fixture(scope="module")
def ct(comfy):
    return comfy["pack"].nodes.comfy_targets


def random_lidb(ct, model, clip, seed=0, rank=1, scale=0.05):
    """A random LiDB for the model (and CLIP, if given): every target, the family recorded."""
    specs = [t.spec for t in ct.model_targets(model).values()]
    specs += [t.spec for t in ct.clip_targets(clip).values()] if clip is not None else []
    g = torch.Generator().manual_seed(seed)
    with torch.inference_mode(False):
        lidb = hdb_core.LiDB.zeros(specs, hdb_core.LiDBConfig(rank=rank, seed=7), trigger="a sks face",
                                   source="random", family=ct.model_family(model))
        return lidb.with_tensors({k: torch.randn(v.shape, generator=g) * scale for k, v in lidb.a_train.items()},
                                 {k: torch.randn(v.shape, generator=g) * scale for k, v in lidb.b_train.items()})


def dit_output(model, clip, seed=0):
    g = torch.Generator().manual_seed(seed)
    channels = model.model.latent_format.latent_channels
    video_shaped = model.model.latent_format.latent_dimensions == 3       # Qwen-Image: [B, C, 1, h, w]
    x = torch.randn(1, channels, *((1,) if video_shaped else ()), 8, 8, generator=g)
    with torch.inference_mode():
        cond, pooled = clip.encode_from_tokens(clip.tokenize("a face"), return_pooled=True)
        conds = model.model.extra_conds(cross_attn=cond, pooled_output=pooled, noise=x, device="cpu",
                                        width=64, height=64)
        kwargs = {k: v.process_cond(batch_size=1, device="cpu", area=None).cond for k, v in conds.items()}
        model.patch_model()
        try:
            return model.model.apply_model(x, torch.tensor([0.5]), **kwargs).clone()
        finally:
            model.unpatch_model()


def test_targets_are_every_attention_projection_with_fused_qkv_split(ct, ckpt, family):
    model, clip, _ = ckpt
    targets = ct.model_targets(model)
    assert len(targets) == EXPECTED_LAYERS[family]
    assert ct.model_family(model) == NAMES[family]
    sd = model.model.state_dict()
    by_weight: dict[str, list] = {}
    for name, t in targets.items():
        assert name.split(".")[0] in ("transformer", "diffusion_model")
        assert not any(bad in t.key for bad in ("mlp", "mod.", "modulation", "feed_forward", "adaLN", "norm"))
        by_weight.setdefault(t.key, []).append(t)
        assert t.spec.out_features == (t.rows[1] if t.rows else sd[t.key].shape[0])
        assert t.spec.in_features == sd[t.key].shape[1]
    fused = {k: v for k, v in by_weight.items() if len(v) > 1}
    assert bool(fused) == (family in FUSED), "fused q/k/v weights must be split"
    for parts in fused.values():                       # q, k, v: adjacent row slices from 0, each its own layer
        rows = sorted(t.rows for t in parts)
        assert len(rows) == 3 and rows[0][0] == 0
        assert all(a[0] + a[1] == b[0] for a, b in zip(rows, rows[1:]))
        assert {n.rsplit(".", 1)[1][-1] for n in (t.spec.name for t in parts)} <= {"q", "k", "v", "j"}


def test_apply_equals_export_through_stock_loraloader(comfy, node, ct, ckpt, caplog):
    import nodes as comfy_nodes

    model, clip, _ = ckpt
    lidb = random_lidb(ct, model, clip, seed=3, rank=2)
    comfy_runtime.call_node(node("HDB_ExportLoRA"), lidb=lidb, filename_prefix=f"dit/{lidb.info['family']}")
    listed = comfy["folder_paths"].get_filename_list("loras")
    name = max(n for n in listed if n.startswith(f"hyperdreambooth/dit/{lidb.info['family']}_"))
    with caplog.at_level(logging.WARNING):
        lora_model, lora_clip = comfy_nodes.LoraLoader().load_lora(model, clip, name, 0.8, 0.6)
    assert "lora key not loaded" not in caplog.text
    ours_model, ours_clip = comfy_runtime.call_node(node("HDB_ApplyLiDB"), model=model, clip=clip, lidb=lidb,
                                                    strength_model=0.8, strength_clip=0.6)
    base = patched_state(model)
    patched_state(clip.patcher)      # unloads the CLIP that comfy.sd.CLIP loaded on creation, as sampling would
    for a, b in ((lora_model, ours_model), (lora_clip.patcher, ours_clip.patcher)):
        sa, sb = patched_state(a), patched_state(b)
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], atol=1e-6, rtol=1e-5)
    # each layer moved by strength * up @ down on exactly its rows; everything else untouched
    got = patched_state(ours_model)
    changed = set()
    for name, t in ct.model_targets(model).items():
        down, up = lidb.down_up(name)
        lo, n = t.rows or (0, got[t.key].shape[0])
        torch.testing.assert_close(got[t.key][lo:lo + n] - base[t.key][lo:lo + n], 0.8 * up @ down,
                                   atol=2e-6, rtol=1e-4)
        changed.add(t.key)
    assert all(torch.equal(base[k], got[k]) for k in set(base) - changed)


def test_strength_zero_is_bit_identical_and_inputs_never_mutate(node, ct, ckpt, hash_weights):
    model, clip, _ = ckpt
    before = (hash_weights(model.model), hash_weights(clip.cond_stage_model))
    base_out = dit_output(model, clip)
    lidb = random_lidb(ct, model, clip)
    m0, _ = comfy_runtime.call_node(node("HDB_ApplyLiDB"), model=model, clip=clip, lidb=lidb,
                                    strength_model=0.0, strength_clip=0.0)
    assert torch.equal(dit_output(m0, clip), base_out)
    m1, _ = comfy_runtime.call_node(node("HDB_ApplyLiDB"), model=model, clip=clip, lidb=lidb,
                                    strength_model=1.0, strength_clip=1.0)
    assert not torch.equal(dit_output(m1, clip), base_out)
    assert torch.equal(dit_output(model, clip), base_out)
    comfy_runtime.call_node(node("HDB_ExportLoRA"), lidb=lidb, filename_prefix="dit/mutation")
    assert (hash_weights(model.model), hash_weights(clip.cond_stage_model)) == before
    assert not model.patches and not clip.patcher.patches


def test_save_then_load_round_trips_with_the_family(comfy, node, ct, ckpt, family):
    model, clip, _ = ckpt
    lidb = random_lidb(ct, model, clip, seed=5)
    comfy_runtime.call_node(node("HDB_SaveLiDB"), lidb=lidb, filename_prefix=f"dit/{family}")
    listed = [n for n in comfy["folder_paths"].get_filename_list("lidb") if n.startswith(f"dit/{family}_")]
    (back,) = comfy_runtime.call_node(node("HDB_LoadLiDB"), lidb_name=listed[-1])
    assert back.layers == lidb.layers and back.info == lidb.info and back.info["family"] == NAMES[family]
    for k in lidb.a_train:
        assert torch.equal(back.a_train[k], lidb.a_train[k]) and torch.equal(back.b_train[k], lidb.b_train[k])


def _graph(family, lidb_name, strength, prefix, weight_format="fp32"):
    return {
        "1": {"class_type": "HDBDev_TinyDiTCheckpoint",
              "inputs": {"family": family, "seed": 0, "weight_format": weight_format}},
        "2": {"class_type": "HDB_LoadLiDB", "inputs": {"lidb_name": lidb_name}},
        "3": {"class_type": "HDB_ApplyLiDB", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lidb": ["2", 0],
                                                        "strength_model": strength, "strength_clip": strength}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a sks face", "clip": ["3", 1]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["3", 1]}},
        "6": {"class_type": EMPTY_LATENT.get(family, "EmptySD3LatentImage"),
              "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {"model": ["3", 0], "positive": ["4", 0], "negative": ["5", 0],
                                                   "latent_image": ["6", 0], "seed": 1, "steps": 2, "cfg": 2.0,
                                                   "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": prefix}},
    }


@pytest.mark.parametrize("weight_format", ["fp32", "scaled_fp8", "fp8_mixed"])
def test_graph_load_apply_ksampler_runs_and_the_lidb_changes_the_image(comfy, ct, family, weight_format):
    folder = os.path.join(comfy["folder_paths"].models_dir, "lidb")
    os.makedirs(folder, exist_ok=True)
    model, clip, _ = tiny_dits.comfy_dit_checkpoint(family, "tiny", seed=0)
    hdb_core.save_lidb(random_lidb(ct, model, clip, scale=0.3), os.path.join(folder, f"dit_{family}.safetensors"))
    name = f"dit_{family}.safetensors"
    with_id = comfy_runtime.run_prompt(_graph(family, name, 1.0, f"{family}_with", weight_format))
    without = comfy_runtime.run_prompt(_graph(family, name, 0.0, f"{family}_without", weight_format))
    assert with_id.success and without.success, (with_id.error, without.error)
    img = lambda r: r.node_output("8")[0]  # noqa: E731
    assert img(with_id).shape == (1, 64, 64, 3) and not torch.equal(img(with_id), img(without))


@pytest.fixture(scope="module")
def photo():
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 6, 5, generator=g), size=(96, 80), mode="bicubic")
    return smooth.clamp(0, 1).movedim(1, -1).contiguous()


def test_fast_finetune_three_steps_trains_every_target_with_a_finite_loss(node, ct, ckpt, photo, family,
                                                                          hash_weights, caplog):
    model, clip, vae = ckpt
    before = (hash_weights(model.model), hash_weights(clip.cond_stage_model))
    runs = []
    with caplog.at_level(logging.INFO, logger="HyperDreamBooth"):
        for checkpointing in (False, True):
            runs.append(comfy_runtime.call_node(node("HDB_FastFinetune"), model=model, clip=clip, vae=vae,
                                                image=photo, trigger="a ohwx face", steps=3, learning_rate=1e-2,
                                                relaxed_rank=2, train_text_encoder=True, resolution=64, seed=0,
                                                gradient_checkpointing=checkpointing))
    (lidb, curve), (again, _) = runs
    if family in FROZEN:          # train_text_encoder on an LLM/T5 encoder: trains what it can and says so
        assert f"text encoder(s) {FROZEN[family]} stay frozen" in caplog.text
    assert curve.shape[-1] == 3
    wanted = set(ct.model_targets(model)) | set(ct.clip_targets(clip))
    assert {s.name for s in lidb.layers} == wanted
    assert lidb.info["family"] == NAMES[family] and lidb.is_finite()
    still = {n for n in ct.model_targets(model) if lidb.delta(n).abs().max() == 0}
    assert still == DEAD_END.get(family, set()), "every transformer target whose output is read must learn"
    for name in wanted:                                     # gradient checkpointing changes nothing but memory
        torch.testing.assert_close(again.delta(name), lidb.delta(name), atol=1e-6, rtol=1e-4)
    assert (hash_weights(model.model), hash_weights(clip.cond_stage_model)) == before
    assert not model.patches


def test_a_lidb_of_another_family_is_refused_in_one_sentence(node, ct, ckpt, tiny_sd, family):
    model, clip, _ = ckpt
    sd_model, sd_clip, _ = tiny_sd
    ours = random_lidb(ct, model, clip)
    sd_lidb = random_lidb(ct, sd_model, sd_clip)
    with pytest.raises(hdb_core.HDBError, match=r"^This LiDB was made for .*UNet.*, but the connected model has an? "
                                                rf"{NAMES[family]} transformer .*\.$"):
        comfy_runtime.call_node(node("HDB_ApplyLiDB"), model=model, clip=clip, lidb=sd_lidb)
    with pytest.raises(hdb_core.HDBError, match=rf"^This LiDB was made for an? {NAMES[family]} transformer .*, but "
                                                rf"the connected model has .*UNet.*\.$"):
        comfy_runtime.call_node(node("HDB_ApplyLiDB"), model=sd_model, clip=sd_clip, lidb=ours)
    # as an init_lidb, and without a stored family (older files): the layer names tell
    with pytest.raises(hdb_core.HDBError, match=r"^This LiDB was made for a diffusion transformer .*, but the "
                                                r"connected model has .*UNet.*\.$"):
        comfy_runtime.call_node(node("HDB_FastFinetune"), model=sd_model, clip=sd_clip, vae=tiny_sd[2],
                                image=torch.rand(1, 64, 64, 3), init_lidb=ours.with_info(family=""), steps=1,
                                resolution=64)
    other = "SD3.5" if family != "sd35" else "Flux.1"       # the family stored in the file is checked first
    with pytest.raises(hdb_core.HDBError, match=rf"^This LiDB was made for {other} but the connected model is "
                                                rf"{NAMES[family]}; connect a {other} model, or use one made for "
                                                rf"{NAMES[family]}\.$"):
        comfy_runtime.call_node(node("HDB_ApplyLiDB"), model=model, clip=clip, lidb=ours.with_info(family=other))


@pytest.mark.parametrize("pair", ["sd15_model_sdxl_clip", "dit_model_sdxl_clip"])
def test_a_clip_of_another_model_is_refused_in_one_sentence(comfy, node, ckpt, tiny_sd, photo, pair):
    model, _, vae = tiny_sd if pair.startswith("sd15") else ckpt
    clip = tiny_models.comfy_clip_of("sdxl")      # 64-wide features (two 32-wide encoders)
    with pytest.raises(hdb_core.HDBError, match=r"^The connected CLIP gives .* which the connected model .* cannot "
                                                r"read; connect the CLIP \(text encoder\) that belongs to this "
                                                r"checkpoint\.$"):
        comfy_runtime.call_node(node("HDB_FastFinetune"), model=model, clip=clip, vae=vae, image=photo,
                                trigger="a ohwx face", steps=1, learning_rate=1e-2, relaxed_rank=1,
                                train_text_encoder=False, resolution=64, seed=0)


def test_random_hypernetwork_predicts_a_lidb_for_the_dit_and_is_refused_elsewhere(comfy, node, ct, ckpt, tiny_sd,
                                                                                  family):
    from folder_paths import get_folder_paths

    model, clip, _ = ckpt
    layers = [t.spec for t in ct.model_targets(model).values()] + [t.spec for t in ct.clip_targets(clip).values()]
    folder = get_folder_paths("hyperdreambooth")[0]
    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(0)
    encoder = hdb_core.EncoderSpec(hidden_size=32, num_tokens=17, image_size=56, name="tiny CLIP vision (dev)")
    with torch.inference_mode(False):
        net = hdb_core.HyperNetwork(hdb_core.HyperNetConfig(width=32, depth=1, heads=2, iterations=2), layers,
                                    hdb_core.LiDBConfig(), encoder)
        hdb_core.save_hypernet(net, os.path.join(folder, f"dit_{family}.safetensors"),
                               {"family": NAMES[family], "base_model": "tiny dev"})
    meta = hdb_core.hypernet.file.read_hypernet_metadata(os.path.join(folder, f"dit_{family}.safetensors"))
    assert meta["family"] == NAMES[family] and NAMES[family] in meta["arch"]
    (hypernet,) = comfy_runtime.call_node(node("HDB_LoadHyperNet"), hypernet_name=f"dit_{family}.safetensors")
    (vision,) = comfy_runtime.call_node(node("HDBDev_TinyClipVision"), seed=0)
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    (lidb,) = comfy_runtime.call_node(node("HDB_PredictLiDBWeights"), hypernet=hypernet, clip_vision=vision,
                                      image=image)
    assert [s.name for s in lidb.layers] == [s.name for s in layers] and lidb.info["family"] == NAMES[family]
    assert any(lidb.delta(s.name).abs().max() > 0 for s in layers)
    new_model, _ = comfy_runtime.call_node(node("HDB_ApplyLiDB"), model=model, clip=clip, lidb=lidb)
    assert new_model.patches
    with pytest.raises(hdb_core.HDBError, match=rf"^This LiDB was made for an? {NAMES[family]} transformer"):
        comfy_runtime.call_node(node("HDB_ApplyLiDB"), model=tiny_sd[0], clip=tiny_sd[1], lidb=lidb)


@pytest.mark.parametrize("weight_format", [f for f in tiny_dits.WEIGHT_FORMATS if f != "fp32"])
def test_stored_weight_formats_train_apply_and_export_alike(comfy, node, ct, family, photo, weight_format,
                                                            hash_weights, caplog):
    """bf16, fp16, ComfyUI's scaled fp8 and the fp8 mixed-precision format (QuantizedTensor weights in a
    Linear that is not a torch.nn.Linear): same targets, finetune learns, Apply == Export + LoraLoader."""
    import nodes as comfy_nodes

    with torch.inference_mode():
        reference = tiny_dits.comfy_dit_checkpoint(family, "tiny", seed=0)
        model, clip, vae = tiny_dits.comfy_dit_checkpoint(family, "tiny", seed=0, weight_format=weight_format)
    assert {n: t.spec for n, t in ct.model_targets(model).items()} == \
        {n: t.spec for n, t in ct.model_targets(reference[0]).items()}
    before = hash_weights(model.model)
    lidb, _ = comfy_runtime.call_node(node("HDB_FastFinetune"), model=model, clip=clip, vae=vae, image=photo,
                                      trigger="a ohwx face", steps=3, learning_rate=1e-2, relaxed_rank=2,
                                      train_text_encoder=False, resolution=64, seed=0)
    still = {n for n in ct.model_targets(model) if lidb.delta(n).abs().max() == 0}
    assert lidb.is_finite() and still == DEAD_END.get(family, set())
    assert hash_weights(model.model) == before

    strong = random_lidb(ct, model, None, seed=1, scale=0.3)
    base_out = dit_output(model, clip)
    m0, _ = comfy_runtime.call_node(node("HDB_ApplyLiDB"), model=model, clip=clip, lidb=strong, strength_model=0.0)
    assert torch.equal(dit_output(m0, clip), base_out)
    ours, _ = comfy_runtime.call_node(node("HDB_ApplyLiDB"), model=model, clip=clip, lidb=strong)
    prefix = f"dit/{family}_{weight_format}"
    comfy_runtime.call_node(node("HDB_ExportLoRA"), lidb=strong, filename_prefix=prefix)
    name = max(n for n in comfy["folder_paths"].get_filename_list("loras")
               if n.startswith(f"hyperdreambooth/{prefix}_"))
    with caplog.at_level(logging.WARNING):
        theirs, _ = comfy_nodes.LoraLoader().load_lora(model, clip, name, 1.0, 1.0)
    assert "lora key not loaded" not in caplog.text
    out = dit_output(ours, clip)
    assert not torch.equal(out, base_out)
    torch.testing.assert_close(dit_output(theirs, clip), out, atol=1e-5, rtol=1e-4)
    assert hash_weights(model.model) == before


def test_a_unet_in_fp8_mixed_precision_is_found_trained_and_patched(comfy, node, ct, tiny_sd, photo, caplog):
    """SD1.5 stored in the fp8 mixed-precision format: its Linear is not a torch.nn.Linear, and the pack used
    to answer 'no attention projections'."""
    import nodes as comfy_nodes
    from comfy import model_base, model_patcher, supported_models

    reference, clip, vae = tiny_sd
    cfg = tiny_models.comfy_unet_config("tiny")
    config = supported_models.SD15(cfg)
    config.unet_config.update(num_heads=cfg["num_heads"], num_head_channels=-1)
    with torch.inference_mode():
        base = tiny_dits.stored_as(reference.model, config, model_base.BaseModel, "fp8_mixed", "cpu")
    model = model_patcher.ModelPatcher(base, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    assert type(base.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn1.to_q).__mro__[1] is \
        torch.nn.Module
    targets = ct.model_targets(model)
    assert {n: t.spec for n, t in targets.items()} == {n: t.spec for n, t in ct.model_targets(reference).items()}
    lidb, _ = comfy_runtime.call_node(node("HDB_FastFinetune"), model=model, clip=clip, vae=vae, image=photo,
                                      trigger="a ohwx face", steps=3, learning_rate=1e-2, relaxed_rank=2,
                                      train_text_encoder=False, resolution=64, seed=0)
    assert all(lidb.delta(n).abs().max() > 0 for n in targets)
    strong = random_lidb(ct, model, None, seed=2, scale=0.3)
    comfy_runtime.call_node(node("HDB_ExportLoRA"), lidb=strong, filename_prefix="unet_fp8_mixed")
    name = max(n for n in comfy["folder_paths"].get_filename_list("loras")
               if n.startswith("hyperdreambooth/unet_fp8_mixed_"))
    with caplog.at_level(logging.WARNING):
        theirs, _ = comfy_nodes.LoraLoader().load_lora(model, clip, name, 1.0, 1.0)
    assert "lora key not loaded" not in caplog.text
    ours, _ = comfy_runtime.call_node(node("HDB_ApplyLiDB"), model=model, clip=clip, lidb=strong)
    base_sd = patched_state(model)        # unloads the model finetuning loaded, as sampling another would
    sa, sb = patched_state(theirs), patched_state(ours)
    plain = lambda t: t.dequantize() if hasattr(t, "dequantize") else t  # noqa: E731  (QuantizedTensor)
    assert len([k for k in sa if not torch.equal(plain(sa[k]), plain(base_sd[k]))]) == len(targets)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_a_family_not_covered_is_refused_in_one_sentence(node, ct, tiny_sd, photo):
    """Wan 2.1 (video): ComfyUI's table has no diffusers attention names for it, so nothing is a target."""
    from comfy import model_base, model_patcher, supported_models

    config = supported_models.WAN21_T2V(dict(image_model="wan2.1", model_type="t2v", dim=32, ffn_dim=64,
                                             num_heads=2, num_layers=1, text_dim=32, freq_dim=32))
    with torch.device("meta"):
        wan = model_base.WAN21(config, device="meta")
    model = model_patcher.ModelPatcher(wan, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    sd_model, clip, vae = tiny_sd
    lidb = random_lidb(ct, sd_model, clip)
    expect = r"^The connected model \(WAN21_T2V\) is a family HyperDreamBooth does not cover yet; it supports .*\.$"
    with pytest.raises(hdb_core.HDBError, match=expect):
        comfy_runtime.call_node(node("HDB_ApplyLiDB"), model=model, clip=clip, lidb=lidb)
    with pytest.raises(hdb_core.HDBError, match=expect):
        comfy_runtime.call_node(node("HDB_FastFinetune"), model=model, clip=clip, vae=vae, image=photo,
                                trigger="a ohwx face", steps=1, learning_rate=1e-2, relaxed_rank=1,
                                train_text_encoder=False, resolution=64, seed=0)


FULL_SIZE = {"flux1": (304, 228), "sd35": (303, 228), "flux2": (120, 90), "zimage": (136, 102), "qwenimage": (480, 0)}


def test_full_size_target_counts_docs_quote(ct, family):
    """The real shapes on the meta device (docs/families.md's table; bench/dit_family_sizes.py adds file sizes)."""
    model = tiny_dits.comfy_dit_checkpoint(family, "full", device="meta")[0]
    targets = ct.model_targets(model)
    assert (len(targets), sum(t.rows is not None for t in targets.values())) == FULL_SIZE[family]
