"""An exported LiDB is an ordinary LoRA: diffusers reads it with the same deltas (kohya keys for SD1.x, the
diffusers/PEFT layout for the DiTs: Flux.1, SD3.5, Z-Image, Qwen-Image)."""
import os

import pytest
import torch

from devtools.comfy_runtime import comfy_path

from hdb_core.lidb.weights import LiDB, LiDBConfig
from hdb_core.lidb.lora_export import save_kohya
from hdb_core.lidb.targets import specs_from_module



def tiny_pipeline():
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                                attention_head_dim=4, sample_size=8, norm_num_groups=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    te = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                      num_hidden_layers=2, projection_dim=32))
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4)
    tok_dir = os.path.join(comfy_path(), "comfy", "sd1_tokenizer")
    tok = CLIPTokenizer(os.path.join(tok_dir, "vocab.json"), os.path.join(tok_dir, "merges.txt"))
    return StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=DDPMScheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def test_diffusers_load_lora_weights_gives_the_lidb_deltas(tmp_path):
    pipe = tiny_pipeline()
    specs = specs_from_module(pipe.unet, "unet") + specs_from_module(pipe.text_encoder, "te")
    g = torch.Generator().manual_seed(0)
    lidb = LiDB.zeros(specs, LiDBConfig(rank=2, seed=5))
    lidb = lidb.with_tensors({k: torch.randn(v.shape, generator=g) * 0.1 for k, v in lidb.a_train.items()},
                             {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in lidb.b_train.items()})
    path = save_kohya(lidb, str(tmp_path / "id_lora.safetensors"))
    modules = {"unet": pipe.unet, "te": pipe.text_encoder}
    before = {s.name: modules[s.component].get_submodule(s.name.split(".", 1)[1]).weight.detach().clone()
              for s in specs}
    pipe.load_lora_weights(str(tmp_path), weight_name=os.path.basename(path))
    pipe.fuse_lora(lora_scale=1.0)
    for s in specs:
        after = modules[s.component].get_submodule(s.name.split(".", 1)[1]).weight.detach()
        torch.testing.assert_close(after - before[s.name], lidb.delta(s.name), atol=1e-6, rtol=1e-4)
    assert len(specs) == 8 * 4 + 4 * 2  # 4 transformer blocks (down, mid, 2 up) x 8; 2 CLIP layers x 4


def test_diffusers_flux_reads_the_dit_export_with_the_same_deltas(comfy, tmp_path):
    """A Flux.1 LiDB exported in the diffusers/PEFT layout loads into diffusers' FluxTransformer2DModel (and
    its CLIP-L) offline with the LiDB's exact deltas, and ComfyUI's table names the same layers diffusers has."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from devtools import tiny_dits
    from hdb_core.lidb.targets import LayerSpec, is_dit_projection, is_linear

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    te = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                      num_hidden_layers=2, projection_dim=32))
    paths = {p for p, _ in transformer.named_modules()}
    specs = [LayerSpec(f"transformer.{p}", m.in_features, m.out_features) for p, m in transformer.named_modules()
             if is_linear(m) and is_dit_projection(p, paths)]
    ct = comfy["pack"].nodes.comfy_targets
    comfy_model = tiny_dits.comfy_dit_checkpoint("flux1", "tiny")[0]
    assert sorted(specs, key=lambda s: s.name) == sorted((t.spec for t in ct.model_targets(comfy_model).values()),
                                                         key=lambda s: s.name)
    specs += specs_from_module(te, "te")
    g = torch.Generator().manual_seed(0)
    lidb = LiDB.zeros(specs, LiDBConfig(rank=2, seed=5), family="Flux.1")
    lidb = lidb.with_tensors({k: torch.randn(v.shape, generator=g) * 0.1 for k, v in lidb.a_train.items()},
                             {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in lidb.b_train.items()})
    state = load_file(save_kohya(lidb, str(tmp_path / "flux_id.safetensors")))
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in state)
    modules = {"transformer": transformer, "te": te}
    weight = lambda s: modules[s.component].get_submodule(s.name.split(".", 1)[1]).weight  # noqa: E731
    before = {s.name: weight(s).detach().clone() for s in specs}
    transformer.load_lora_adapter(state, prefix="transformer", adapter_name="hdb")
    FluxPipeline.load_lora_into_text_encoder(state, network_alphas=None, text_encoder=te, adapter_name="hdb")
    transformer.fuse_lora(lora_scale=1.0)
    from peft.tuners.tuners_utils import BaseTunerLayer

    for m in te.modules():
        if isinstance(m, BaseTunerLayer):
            m.merge(adapter_names=["hdb"])
    base = lambda s: getattr(modules[s.component].get_submodule(s.name.split(".", 1)[1]), "base_layer",  # noqa: E731
                             modules[s.component].get_submodule(s.name.split(".", 1)[1])).weight
    for s in specs:
        torch.testing.assert_close(base(s).detach() - before[s.name], lidb.delta(s.name), atol=1e-6, rtol=1e-4)
    assert len(specs) == 2 * 8 + 2 * 4 + 2 * 4


def _diffusers_dit(family: str):
    """Tiny diffusers transformers with the shapes of devtools/tiny_dits.py's tiny configs."""
    import diffusers

    torch.manual_seed(0)
    if family == "sd35":
        return diffusers.SD3Transformer2DModel(
            sample_size=32, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=64, num_attention_heads=2,
            joint_attention_dim=4096, caption_projection_dim=128, pooled_projection_dim=64, out_channels=16,
            pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")
    if family == "zimage":
        return diffusers.ZImageTransformer2DModel(in_channels=16, dim=256, n_layers=2, n_refiner_layers=1, n_heads=4,
                                                  n_kv_heads=4, cap_feat_dim=32, axes_dims=[16, 24, 24],
                                                  axes_lens=[64, 32, 32])
    return diffusers.QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=2,
                                                 attention_head_dim=16, num_attention_heads=2,
                                                 joint_attention_dim=32, axes_dims_rope=(4, 6, 6))


@pytest.mark.parametrize("family", ["sd35", "zimage", "qwenimage"])
def test_diffusers_dits_read_the_export_with_the_same_deltas(comfy, tmp_path, family):
    """SD3.5, Z-Image and Qwen-Image exports: every layer ComfyUI's table names exists in diffusers' own
    transformer under the same path and shape, and load_lora_adapter gives the LiDB's exact deltas."""
    from safetensors.torch import load_file

    from devtools import tiny_dits

    ct = comfy["pack"].nodes.comfy_targets
    specs = [t.spec for t in ct.model_targets(tiny_dits.comfy_dit_checkpoint(family, "tiny")[0]).values()]
    transformer = _diffusers_dit(family)
    layer = lambda s: transformer.get_submodule(s.name.split(".", 1)[1])  # noqa: E731
    assert all((layer(s).in_features, layer(s).out_features) == (s.in_features, s.out_features) for s in specs)
    g = torch.Generator().manual_seed(0)
    lidb = LiDB.zeros(specs, LiDBConfig(rank=2, seed=5))
    lidb = lidb.with_tensors({k: torch.randn(v.shape, generator=g) * 0.1 for k, v in lidb.a_train.items()},
                             {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in lidb.b_train.items()})
    state = load_file(save_kohya(lidb, str(tmp_path / f"{family}.safetensors")))
    before = {s.name: layer(s).weight.detach().clone() for s in specs}
    transformer.load_lora_adapter(state, prefix=specs[0].component, adapter_name="hdb")
    transformer.fuse_lora(lora_scale=1.0)
    for s in specs:
        after = getattr(layer(s), "base_layer", layer(s)).weight.detach()
        torch.testing.assert_close(after - before[s.name], lidb.delta(s.name), atol=1e-6, rtol=1e-4)
