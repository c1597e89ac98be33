"""An exported LiDB is an ordinary kohya LoRA: diffusers' own LoRA loader reads it with the same deltas."""
import os

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
