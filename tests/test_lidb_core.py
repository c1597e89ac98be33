"""LiDB maths, rank relaxation and the full-size SD1.5 numbers the README quotes."""
import os

import pytest
import torch

from hdb_core.lidb.file import save_lidb
from hdb_core.lidb.weights import LiDB, LiDBConfig
from hdb_core.lidb.targets import LayerSpec, describe, kohya_name, specs_from_module

LAYERS = (LayerSpec("unet.x.attn1.to_q", 320, 320), LayerSpec("unet.x.attn2.to_k", 768, 320),
          LayerSpec("te.text_model.encoder.layers.0.self_attn.out_proj", 768, 768))


def random_lidb(layers=LAYERS, rank=1, seed=0) -> LiDB:
    g = torch.Generator().manual_seed(seed)
    cfg = LiDBConfig(rank=rank, seed=3)
    lidb = LiDB.zeros(layers, cfg)
    return lidb.with_tensors({k: torch.randn(v.shape, generator=g) for k, v in lidb.a_train.items()},
                             {k: torch.randn(v.shape, generator=g) for k, v in lidb.b_train.items()})


def test_delta_is_the_papers_product_transposed():
    lidb = random_lidb()
    for spec in lidb.layers:
        a_aux, b_aux = lidb.aux(spec.name)
        paper = a_aux @ lidb.a_train[spec.name] @ lidb.b_train[spec.name] @ b_aux   # [in, out]
        assert torch.allclose(lidb.delta(spec.name), paper.T, atol=1e-6)
        assert lidb.delta(spec.name).shape == (spec.out_features, spec.in_features)
        assert torch.linalg.matrix_rank(lidb.delta(spec.name)) == 1


def test_relaxed_rank_reproduces_delta_exactly_and_adds_trainable_directions():
    lidb = random_lidb()
    relaxed = lidb.relaxed(4, torch.Generator().manual_seed(1))
    assert relaxed.config.rank == 4
    for spec in lidb.layers:
        assert torch.equal(relaxed.delta(spec.name), lidb.delta(spec.name))
        assert relaxed.a_train[spec.name][:, 1:].abs().sum() > 0   # new directions can receive gradients
    with pytest.raises(ValueError):
        relaxed.relaxed(2, torch.Generator())


def test_trainable_start_has_zero_delta_but_nonzero_factor():
    lidb = LiDB.trainable_start(LAYERS, LiDBConfig(), torch.Generator().manual_seed(0))
    for spec in LAYERS:
        assert torch.count_nonzero(lidb.delta(spec.name)) == 0
        assert lidb.a_train[spec.name].abs().sum() > 0


def test_derived_lidbs_do_not_mutate_the_original():
    lidb = random_lidb()
    before = {k: v.clone() for k, v in lidb.a_train.items()}
    lidb.relaxed(3, torch.Generator())
    lidb.with_info(trigger="x").components({"unet"})
    assert all(torch.equal(before[k], lidb.a_train[k]) for k in before) and lidb.info == {}


def test_kohya_names():
    assert kohya_name("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0") == \
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"
    assert kohya_name("te.text_model.encoder.layers.3.self_attn.q_proj") == \
        "lora_te_text_model_encoder_layers_3_self_attn_q_proj"
    assert kohya_name("te2.text_model.encoder.layers.3.self_attn.q_proj").startswith("lora_te2_")


def _sd15_specs():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64)  # SD1.5 config
        te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                          num_hidden_layers=12, projection_dim=768))  # CLIP-L/14 text tower
    return specs_from_module(unet, "unet") + specs_from_module(te, "te"), unet


def test_full_size_sd15_targets_count_and_file_size(tmp_path, capsys):
    specs, unet = _sd15_specs()
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    unet_specs = [s for s in specs if s.component == "unet"]
    assert len(unet_specs) == 128 and len(specs) - 128 == 48
    assert sorted({s.in_features for s in unet_specs if s.name.endswith("attn2.to_k")}) == [768]
    assert describe(specs).startswith("a SD1.x UNet (128 attention projections) and a CLIP-L")
    for rank in (1, 4):  # 1: LiDB / hypernet prediction; 4: FastFinetune's default relaxed rank
        lidb = LiDB.zeros(specs, LiDBConfig(rank=rank))
        assert lidb.num_trainable == 176 * 150 * rank
        size = os.path.getsize(save_lidb(lidb, str(tmp_path / f"sd15_r{rank}.safetensors")))
        with capsys.disabled():
            print(f"\nSD1.5 rank-{rank} LiDB: {len(specs)} layers, {lidb.num_trainable} numbers, file {size} bytes")
        # float32 numbers; the compact layout keeps the header small (about 13 KB of layer names).
        assert lidb.num_trainable * 4 < size < lidb.num_trainable * 4 + 20_000
    # The paper's relaxation at rank 4: the rank-1 prediction kept, plus a free rank-4 LoRA per layer.
    free = LiDB.zeros(specs, LiDBConfig()).with_free_lora(4, torch.Generator().manual_seed(0))
    assert free.num_trainable == 176 * 150 + 4 * sum(s.in_features + s.out_features for s in specs)
    size = os.path.getsize(save_lidb(free, str(tmp_path / "sd15_free4.safetensors")))
    with capsys.disabled():
        print(f"\nSD1.5 rank-1 + free rank-4 LiDB: {free.num_trainable} numbers, file {size} bytes")
    assert free.num_trainable * 4 < size < free.num_trainable * 4 + 25_000
    # The identity subspace `hdb pipeline` writes beside the hypernetwork: mean + 128 directions of rows.
    from hdb_core.lidb.subspace import IdentitySubspace, save_subspace

    g = torch.Generator().manual_seed(0)
    lidbs = [LiDB.trainable_start(specs, LiDBConfig(), g) for _ in range(129)]
    subspace = IdentitySubspace.fit(lidbs, 128)
    size = os.path.getsize(save_subspace(subspace, str(tmp_path / "sd15.subspace.safetensors")))
    with capsys.disabled():
        print(f"\nSD1.5 identity subspace, 128 directions: file {size} bytes")
    assert subspace.components == 128 and 129 * 26_400 * 4 < size < 129 * 26_400 * 4 + 20_000


def test_comfyui_and_diffusers_name_full_sd15_identically(comfy):
    """Canonical names from ComfyUI's UNet (via its own conversion table) equal diffusers' module paths."""
    from devtools import tiny_models

    specs, _ = _sd15_specs()
    comfy_targets = comfy["pack"].nodes.comfy_targets.unet_targets(tiny_models.comfy_model("full", device="meta"))
    as_tuples = lambda specs: {(s.name, s.in_features, s.out_features) for s in specs}  # noqa: E731
    assert as_tuples(t.spec for t in comfy_targets.values()) == as_tuples(s for s in specs if s.component == "unet")


def test_dit_projections_and_export_keys_from_diffusers_names():
    """Which diffusers paths of a DiT are attention projections, and the key each layer exports under."""
    from hdb_core.lidb.targets import is_dit_projection, lora_key

    paths = {"transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_k_proj",
             "transformer_blocks.0.attn2.to_v", "transformer_blocks.0.attn.to_out.0",
             "transformer_blocks.0.attn.to_add_out", "transformer_blocks.0.ff.net.2",
             "transformer_blocks.0.norm1.linear", "single_transformer_blocks.0.attn.to_q",
             "single_transformer_blocks.0.proj_out", "single_transformer_blocks.0.proj_mlp", "proj_out",
             "layers.0.attention.to_k", "layers.0.feed_forward.w1", "layers.0.adaLN_modulation.0"}
    chosen = {p for p in paths if is_dit_projection(p, paths)}
    assert chosen == {"transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_k_proj",
                      "transformer_blocks.0.attn2.to_v", "transformer_blocks.0.attn.to_out.0",
                      "transformer_blocks.0.attn.to_add_out", "single_transformer_blocks.0.attn.to_q",
                      "single_transformer_blocks.0.proj_out", "layers.0.attention.to_k"}
    name = "transformer.transformer_blocks.0.attn.to_q"
    assert lora_key(name, dit=True) == name
    assert lora_key("te1.text_model.encoder.layers.0.self_attn.q_proj", dit=True) == \
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    assert lora_key("te2.text_model.encoder.layers.0.self_attn.q_proj", dit=True).startswith("text_encoder_2.")
    assert lora_key("unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q", dit=False).startswith("lora_unet_")
