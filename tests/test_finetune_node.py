"""HDB_FastFinetune on a real ComfyUI with tiny random SD1.5-architecture checkpoints.

Models are built under inference mode where it matters, as the executor loads
them, so the inference-tensor escape is exercised; resolution 64 keeps steps fast.
"""
from __future__ import annotations

import os

import pytest
import torch

import hdb_core
import hdb_core.training.injector
import hdb_core.training.objective

from devtools import comfy_runtime, tiny_models

RES = 64
TRIGGER = "a ohwx face"



@pytest.fixture(scope="module")
def tr(comfy):
    return comfy["pack"].nodes.comfy_training


@pytest.fixture(scope="module")
def pack_nodes(comfy):
    return comfy["pack"].nodes


@pytest.fixture(scope="module")
def ckpt(comfy):
    """A tiny checkpoint loaded under inference mode, as the executor's loaders do (never mutated)."""
    with torch.inference_mode():
        return tiny_models.comfy_checkpoint("tiny", seed=0)


@pytest.fixture(scope="module")
def photo():
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 6, 5, generator=g), size=(96, 80), mode="bicubic")
    return smooth.clamp(0, 1).movedim(1, -1).contiguous()


def finetune(node, model, clip, vae, image, **kw):
    args = dict(trigger=TRIGGER, steps=20, learning_rate=1e-2, relaxed_rank=4, train_text_encoder=True,
                resolution=RES, seed=0)
    args.update(kw)
    return comfy_runtime.call_node(node("HDB_FastFinetune"), model=model, clip=clip, vae=vae, image=image, **args)


def unet_probe(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.inference_mode():
        return model.model.apply_model(x, torch.tensor([3.0]), c_crossattn=ctx).clone()


def clip_probe(clip) -> torch.Tensor:
    with torch.inference_mode():
        return clip.encode_from_tokens(clip.tokenize("a photo of a person")).clone()


def module_state(module: torch.nn.Module):
    """Everything training could leave behind: parameter/buffer objects, hooks, instance forwards, grads."""
    return ([(n, id(p)) for n, p in module.named_parameters()], [(n, id(b)) for n, b in module.named_buffers()],
            sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules()),
            sum("forward" in m.__dict__ for m in module.modules()),
            sum(p.grad is not None for p in module.parameters()))


def assert_clean(model, clip, before, hash_weights):
    hashes, probes, states = before
    assert (hash_weights(model.model), hash_weights(clip.cond_stage_model)) == hashes
    assert torch.equal(unet_probe(model), probes[0]) and torch.equal(clip_probe(clip), probes[1])
    assert (module_state(model.model), module_state(clip.cond_stage_model)) == states


def snapshot(model, clip, hash_weights):
    return ((hash_weights(model.model), hash_weights(clip.cond_stage_model)),
            (unet_probe(model), clip_probe(clip)),
            (module_state(model.model), module_state(clip.cond_stage_model)))


@pytest.fixture(scope="module")
def from_zero(comfy, node, ckpt, photo, tr):
    """One training run from zero, shared by the tests that inspect its result."""
    model, clip, vae = ckpt
    bare = tr.held_out_loss(model, clip, vae, photo, None, TRIGGER, RES)
    lidb, curve = finetune(node, model, clip, vae, photo, steps=30)
    return lidb, curve, bare


def test_from_zero_loss_falls_and_result_is_a_rank_r_lidb(comfy, ckpt, photo, tr, from_zero):
    model, clip, vae = ckpt
    lidb, curve, bare = from_zero
    assert isinstance(lidb, hdb_core.LiDB) and lidb.config.rank == 4 and lidb.is_finite()
    assert {s.component for s in lidb.layers} == {"unet", "te"} and len(lidb.layers) == 64
    assert lidb.info["trigger"] == TRIGGER and lidb.info["source"] == "trained" and lidb.info["base_model"] == "SD15"
    assert curve.shape == (1, 360, 640, 3) and 0 <= curve.min() and curve.max() <= 1
    trained = tr.held_out_loss(model, clip, vae, photo, lidb, TRIGGER, RES)
    assert trained < 0.97 * bare, (trained, bare)


def test_from_init_loss_falls_and_text_encoder_can_stay_frozen(comfy, node, ckpt, photo, tr, from_zero):
    model, clip, vae = ckpt
    init = from_zero[0].with_info(source="predicted")
    start_loss = tr.held_out_loss(model, clip, vae, photo, init, TRIGGER, RES)
    out, _ = finetune(node, model, clip, vae, photo, init_lidb=init, relaxed_rank=6, train_text_encoder=False,
                      seed=3)
    assert out.config.rank == 6 and out.info["source"] == "finetuned"
    assert tr.held_out_loss(model, clip, vae, photo, out, TRIGGER, RES) < start_loss
    for s in init.layers:
        if s.component == "te":  # frozen: the init's dW, exactly
            assert torch.equal(out.delta(s.name), init.delta(s.name))
    assert any(not torch.equal(out.delta(s.name), init.delta(s.name)) for s in init.layers if s.component == "unet")


def test_the_prior_term_with_the_text_encoder_frozen(comfy, node, ckpt, photo, from_zero, hash_weights):
    """The class prompt encoded once with the start's frozen text-encoder residual: the text encoder's part
    stays the start's, the UNet's learns otherwise than without the prior term, and the model is left clean."""
    model, clip, vae = ckpt
    before = snapshot(model, clip, hash_weights)
    init = from_zero[0].with_info(source="predicted")
    runs = {w: finetune(node, model, clip, vae, photo, init_lidb=init, steps=3, train_text_encoder=False,
                        prior_weight=w, class_prompt="a face")[0] for w in (0.0, 1.0)}
    assert runs[1.0].is_finite()
    for s in init.layers:
        if s.component == "te":
            assert torch.equal(runs[1.0].delta(s.name), init.delta(s.name))
    assert any(not torch.allclose(runs[1.0].delta(s.name), runs[0.0].delta(s.name))
               for s in init.layers if s.component == "unet")
    assert_clean(model, clip, before, hash_weights)


def test_base_weights_and_outputs_untouched_and_same_seed_is_identical(comfy, node, ckpt, photo, hash_weights):
    model, clip, vae = ckpt
    before = snapshot(model, clip, hash_weights)
    a, _ = finetune(node, model, clip, vae, photo, steps=4)
    b, _ = finetune(node, model, clip, vae, photo, steps=4)
    c, _ = finetune(node, model, clip, vae, photo, steps=4, seed=1)
    assert all(torch.equal(a.a_train[n], b.a_train[n]) and torch.equal(a.b_train[n], b.b_train[n])
               for n in a.a_train)
    assert any(not torch.equal(a.b_train[n], c.b_train[n]) for n in a.b_train)
    assert_clean(model, clip, before, hash_weights)


def test_draws_per_step_changes_the_steps_not_their_count(comfy, node, ckpt, photo, hash_weights):
    """Each step follows the mean of draws_per_step draws from the seed's stream; one draw per step is
    another run, and either leaves the model as it was."""
    model, clip, vae = ckpt
    before = snapshot(model, clip, hash_weights)
    one, _ = finetune(node, model, clip, vae, photo, steps=3, draws_per_step=1)
    three, _ = finetune(node, model, clip, vae, photo, steps=3, draws_per_step=3)
    assert one.is_finite() and three.is_finite() and one.config.rank == three.config.rank == 4
    assert any(not torch.equal(one.b_train[n], three.b_train[n]) for n in one.b_train)
    assert_clean(model, clip, before, hash_weights)


def test_model_loaded_outside_inference_mode_trains_without_touching_grads(comfy, node, tiny_sd, photo, hash_weights):
    model, clip, vae = tiny_sd
    before = snapshot(model, clip, hash_weights)
    lidb, _ = finetune(node, model, clip, vae, photo, steps=3, gradient_checkpointing=True)
    assert lidb.is_finite()
    assert_clean(model, clip, before, hash_weights)


def test_gradient_checkpointing_gives_the_same_lidb(comfy, node, ckpt, photo):
    model, clip, vae = ckpt
    plain, _ = finetune(node, model, clip, vae, photo, steps=3)
    ckpt_run, _ = finetune(node, model, clip, vae, photo, steps=3, gradient_checkpointing=True)
    # equal but for rounding: the recomputing backward sums in another order, and Adam's step
    # (gradient over its running scale) magnifies that in components whose gradient is near zero
    for n in plain.b_train:
        torch.testing.assert_close(ckpt_run.b_train[n], plain.b_train[n], rtol=1e-3, atol=1e-5)


def test_gradient_checkpointing_keeps_far_fewer_activations_for_backward(comfy, node, ckpt, photo):
    """ComfyUI's UNet runs each block's layers itself (forward_timestep_embed), never the block's forward."""
    model, clip, vae = ckpt

    def saved_bytes(checkpointing: bool) -> int:
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            finetune(node, model, clip, vae, photo, steps=1, draws_per_step=1, train_text_encoder=False,
                     gradient_checkpointing=checkpointing)
        return total

    plain, checkpointed = saved_bytes(False), saved_bytes(True)
    print(f"bytes kept for backward: {plain:,} plain, {checkpointed:,} with checkpointing")
    assert checkpointed < 0.5 * plain, (checkpointed, plain)


def test_cancel_mid_run_leaves_the_model_clean_and_the_next_run_works(comfy, node, ckpt, photo, hash_weights):
    import comfy.model_management as mm
    import comfy.utils

    model, clip, vae = ckpt
    before = snapshot(model, clip, hash_weights)
    seen = []

    def hook(value, total, preview, prompt_id=None, node_id=None):
        seen.append(value)
        if value == 3:
            mm.interrupt_current_processing()   # what the UI's Cancel button does

    old = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            finetune(node, model, clip, vae, photo, steps=50)
    finally:
        comfy.utils.set_progress_bar_global_hook(old)
        mm.interrupt_current_processing(False)
    assert seen == [1, 2, 3], "Cancel must stop at the next step"
    assert_clean(model, clip, before, hash_weights)
    lidb, _ = finetune(node, model, clip, vae, photo, steps=2)
    assert lidb.is_finite()


def test_native_objective_for_eps_and_v_prediction_models(comfy, pack_nodes):
    """The loss equals the MSE of the raw UNet output against eps (eps models) or v (v models)."""
    import comfy.model_management as mm

    for v_pred in (False, True):
        model = tiny_models.comfy_model("tiny", seed=2, v_prediction=v_pred)
        base, ms = model.model, model.model.model_sampling
        g = torch.Generator().manual_seed(0)
        latents, cond = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
        mm.load_models_gpu([model])
        injector = hdb_core.training.injector.LowRankInjector({})
        loss = pack_nodes.comfy_objective.DiffusionLoss(model, torch.stack([latents, latents], 1), injector, None,
                                                        (cond, None), RES, False, torch.device("cpu"))
        with torch.no_grad():
            got = loss(0, {}, torch.Generator().manual_seed(5))
            # Redraw the same photo, timestep and noise, and compute the textbook target by hand.
            d = hdb_core.training.objective.draw(torch.Generator().manual_seed(5), 1, False, 1000, (4, 8, 8))
            noise = d.noise[None]
            sigma = ms.sigmas[d.timestep].reshape(1)
            x = latents + sigma * noise
            raw = base.diffusion_model(x / (sigma ** 2 + 1).sqrt(), ms.timestep(sigma).float(), context=cond)
            target = (noise - sigma * latents) / (sigma ** 2 + 1).sqrt() if v_pred else noise
            want = ((raw - target) ** 2).mean()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_grayscale_and_rgba_photos_are_converted(comfy, node, ckpt, photo, pack_nodes):
    tr = pack_nodes.photo_input
    gray = photo.mean(-1, keepdim=True)
    rgba = torch.cat([photo, torch.zeros_like(photo[..., :1])], dim=-1)
    out_gray, out_rgba = tr.prepare_pixels(gray, RES), tr.prepare_pixels(rgba, RES)
    assert out_gray.shape == out_rgba.shape == (1, RES, RES, 3)
    assert torch.equal(out_gray[..., 0], out_gray[..., 2])
    assert torch.equal(out_rgba, tr.prepare_pixels(photo, RES)), "RGBA: the alpha channel is ignored"
    model, clip, vae = ckpt
    assert finetune(node, model, clip, vae, gray, steps=1)[0].is_finite()


def test_photo_is_resized_and_centre_cropped(pack_nodes):
    tr = pack_nodes.photo_input
    wide = torch.zeros(1, 100, 300, 3)
    wide[:, :, 100:200] = 1.0            # a white centre square in a black frame
    out = tr.prepare_pixels(wide, RES)
    assert out.shape == (1, RES, RES, 3) and out.mean() > 0.95


def other_arch_lidb(comfy):
    ct = comfy["pack"].nodes.comfy_targets
    mid = tiny_models.comfy_model("mid", device="meta")
    specs = [t.spec for t in ct.unet_targets(mid).values()]
    return hdb_core.LiDB.zeros(specs, hdb_core.LiDBConfig())


def no_attention_model():
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models

    cfg = tiny_models.comfy_unet_config("tiny")
    cfg.update(transformer_depth=[0, 0], transformer_depth_middle=0, transformer_depth_output=[0, 0, 0, 0])
    mc = comfy.supported_models.SD15(cfg)
    mc.unet_config.update(num_heads=2, num_head_channels=-1)
    base = comfy.model_base.BaseModel(mc, device="meta")
    return comfy.model_patcher.ModelPatcher(base, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


@pytest.mark.parametrize("case, expect", [
    ("empty", "image batch is empty"),
    ("16x16", "only 16x16 pixels"),
    ("5 channels", "5 channels"),
    ("steps 0", "steps is 0"),
    ("empty trigger", "trigger is empty"),
    ("other architecture", "This LiDB was made for a custom UNet"),
    ("no attention", "has no attention projections"),
    ("rank below init", "set relaxed_rank to 4 or higher"),
    ("prior without a class prompt", "class_prompt is empty"),
    ("negative prior weight", "prior_weight is -1"),
])
def test_bad_inputs_give_one_clear_sentence(comfy, node, ckpt, photo, from_zero, case, expect):
    model, clip, vae = ckpt
    kw = dict(image=photo)
    if case == "empty":
        kw["image"] = photo[:0]
    elif case == "16x16":
        kw["image"] = torch.rand(1, 16, 16, 3)
    elif case == "5 channels":
        kw["image"] = torch.rand(1, 96, 96, 5)
    elif case == "steps 0":
        kw["steps"] = 0
    elif case == "empty trigger":
        kw["trigger"] = "  "
    elif case == "other architecture":
        kw["init_lidb"] = other_arch_lidb(comfy)
    elif case == "no attention":
        model = no_attention_model()
    elif case == "rank below init":
        kw.update(init_lidb=from_zero[0], relaxed_rank=2)
    elif case == "prior without a class prompt":
        kw.update(prior_weight=1.0, class_prompt=" ")
    elif case == "negative prior weight":
        kw["prior_weight"] = -1.0
    with pytest.raises(hdb_core.HDBError) as err:
        finetune(node, model, clip, vae, **kw)
    message = str(err.value)
    assert expect in message and message.endswith(".") and message.count(". ") == 0, message


def test_training_precision_choice(pack_nodes):
    cuda = torch.device("cuda")
    assert pack_nodes.comfy_runtime.training_precision(torch.device("cpu"), torch.float32) == (None, False)
    assert pack_nodes.comfy_runtime.training_precision(cuda, torch.float16) == (torch.float16, True)
    assert pack_nodes.comfy_runtime.training_precision(cuda, torch.bfloat16) == (torch.bfloat16, False)


def graph(image_name: str, prefix: str) -> dict:
    return {
        "1": {"class_type": "HDBDev_TinyCheckpoint", "inputs": {"scale": "tiny", "seed": 0, "v_prediction": False}},
        "2": {"class_type": "LoadImage", "inputs": {"image": image_name}},
        "3": {"class_type": "HDB_FastFinetune", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "image": ["2", 0], "trigger": TRIGGER,
            "steps": 3, "learning_rate": 0.01, "relaxed_rank": 2, "train_text_encoder": True, "resolution": RES,
            "seed": 0}},
        "4": {"class_type": "HDB_ApplyLiDB", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lidb": ["3", 0],
                                                        "strength_model": 1.0, "strength_clip": 1.0}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": f"{TRIGGER}, portrait", "clip": ["4", 1]}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "7": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "8": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "positive": ["5", 0], "negative": ["6", 0],
                                                   "latent_image": ["7", 0], "seed": 1, "steps": 2, "cfg": 2.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": prefix}},
        "11": {"class_type": "PreviewImage", "inputs": {"images": ["3", 1]}},
    }


def test_graph_checkpoint_finetune_apply_sample_save_runs_in_the_executor(comfy, photo):
    from PIL import Image

    folder = comfy["folder_paths"].get_input_directory()
    Image.fromarray((photo[0] * 255).byte().numpy()).save(os.path.join(folder, "hdb_face.png"))
    result = comfy_runtime.run_prompt(graph("hdb_face.png", "finetuned"))
    assert result.success, result.error
    lidb = result.node_output("3")[0]
    assert isinstance(lidb, hdb_core.LiDB) and lidb.config.rank == 2 and lidb.info["source"] == "trained"
    assert result.node_output("9")[0].shape == (1, 64, 64, 3)
    saved = result.outputs["10"]["images"][0]
    assert os.path.isfile(os.path.join(comfy["folder_paths"].get_output_directory(), saved["subfolder"],
                                       saved["filename"]))
    # A bad input fails that node only; the executor keeps working.
    bad = graph("hdb_face.png", "bad")
    bad["3"]["inputs"]["trigger"] = ""
    failed = comfy_runtime.run_prompt(bad)
    assert not failed.success and "trigger is empty" in failed.error["exception_message"]
    assert comfy_runtime.run_prompt(graph("hdb_face.png", "again")).success


def test_free_lora_relaxation_keeps_the_init_and_its_result_applies_and_exports(comfy, node, ckpt, photo):
    model, clip, vae = ckpt
    init, _ = finetune(node, model, clip, vae, photo, steps=3, relaxed_rank=1)
    lidb, _ = finetune(node, model, clip, vae, photo, steps=3, relaxed_rank=2, init_lidb=init,
                       relaxation="free_lora")
    assert lidb.relaxation == "free_lora" and lidb.free_rank == 2 and lidb.config.rank == 1
    assert all(torch.equal(lidb.a_train[n], init.a_train[n]) and torch.equal(lidb.b_train[n], init.b_train[n])
               for n in init.a_train), "the paper's relaxation keeps the start as it is"
    assert any(lidb.free_up[n].abs().sum() > 0 for n in lidb.free_up), "the free LoRA learned"
    new_model, _ = comfy_runtime.call_node(node("HDB_ApplyLiDB"), model=model, clip=clip, lidb=lidb,
                                           strength_model=1.0, strength_clip=1.0)
    from comfy.lora import calculate_weight

    ct = comfy["pack"].nodes.comfy_targets
    name, target = next(iter(ct.unet_targets(model).items()))
    original = model.model.state_dict()[target.key].clone()
    patched = calculate_weight(new_model.patches[target.key], original.clone(), target.key)
    down, up = lidb.down_up(name)
    torch.testing.assert_close(patched - original, up @ down, atol=1e-6, rtol=1e-4)


def test_identity_subspace_from_its_mean_and_wrong_files_get_one_sentence(comfy, node, ckpt, photo, from_zero):
    """Without init_lidb the subspace's mean is the start; the learning rate left at the default becomes the
    subspace's; a file that is no subspace, and a subspace of another layout, are refused in one sentence."""
    from hdb_core import defaults
    from hdb_core.lidb.file import save_lidb
    from hdb_core.lidb.subspace import IdentitySubspace, rows_of, save_subspace

    model, clip, vae = ckpt
    layers = from_zero[0].layers
    g = torch.Generator().manual_seed(3)
    lidbs = [hdb_core.LiDB.trainable_start(layers, hdb_core.LiDBConfig(), g) for _ in range(4)]
    for lidb in lidbs:
        for name in lidb.b_train:
            lidb.b_train[name] = 0.01 * torch.randn(lidb.b_train[name].shape, generator=g)
    subspace = IdentitySubspace.fit(lidbs, 3)
    folder = comfy["folder_paths"].get_folder_paths("hyperdreambooth")[0]
    os.makedirs(folder, exist_ok=True)
    save_subspace(subspace, os.path.join(folder, "node_test.subspace.safetensors"))
    lidb, _ = finetune(node, model, clip, vae, photo, steps=4, learning_rate=defaults.FINETUNE_LR,
                       identity_subspace="node_test.subspace.safetensors")
    assert lidb.layers == layers and lidb.config.rank == 1 and lidb.info["source"] == "trained"
    moved = (rows_of([lidb])[0] - subspace.mean).double()
    coefficients = torch.linalg.lstsq(subspace.directions.double().T, moved[:, None]).solution
    assert (subspace.directions.double().T @ coefficients)[:, 0].sub(moved).norm() < 1e-4 * moved.norm()
    # at the subspace's rate the coefficients move by about a tenth of a spread per step, not 3e-3
    assert coefficients.abs().max() > 0.1

    save_lidb(lidbs[0], os.path.join(folder, "node_test_not_a_subspace.safetensors"))
    other = IdentitySubspace.fit([x.components({"unet"}) for x in lidbs], 2)
    save_subspace(other, os.path.join(folder, "node_test_unet_only.subspace.safetensors"))
    for name, expect in (("node_test_not_a_subspace.safetensors", "is not an identity subspace"),
                         ("node_test_unet_only.subspace.safetensors", "fit to LiDBs of another model"),
                         ("missing.subspace.safetensors", "was not found in")):
        with pytest.raises(hdb_core.HDBError) as err:
            finetune(node, model, clip, vae, photo, steps=1, init_lidb=lidbs[1], identity_subspace=name)
        message = str(err.value)
        assert expect in message and message.endswith(".") and message.count(". ") == 0, message
