"""The two image-encoder paths (ComfyUI CLIP_VISION, transformers) feed the hypernetwork the same features."""
from __future__ import annotations

import pytest
import torch

from hdb_core.errors import HDBError
from hdb_core.hypernet.image_encoder import VIT_H_14, ClipImageEncoder, EncoderSpec, preprocess, spec_from_hf_config



@pytest.fixture(scope="module")
def encoders(comfy):
    from devtools import tiny_vision

    clip_vision = tiny_vision.comfy_clip_vision(seed=3)
    return clip_vision, ClipImageEncoder(tiny_vision.transformers_twin(clip_vision))


def photos():
    g = torch.Generator().manual_seed(0)
    # Non-square, larger than the encoder's input, with an alpha channel: resize, crop and channel drop all matter.
    return torch.rand(2, 70, 93, 4, generator=g)


def test_preprocessing_is_comfyuis(comfy):
    import comfy.clip_vision

    spec = EncoderSpec(image_size=56)
    for images in (photos(), photos()[:, :40, :30, :3], torch.rand(1, 56, 56, 3)):
        expected = comfy.clip_vision.clip_preprocess(images.clone(), size=56)
        assert torch.equal(preprocess(images, spec), expected)


def test_comfy_and_transformers_paths_give_the_same_features(encoders, comfy):
    clip_vision, hf = encoders
    images = photos()
    with torch.inference_mode():
        comfy_out = clip_vision.encode_image(images.clone(), crop=True)
    ours = hf.encode(images)
    theirs = comfy_out["penultimate_hidden_states"].float()
    assert ours.shape == theirs.shape == (2, 17, 32)
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)
    # The comparison is not trivially passing: the last layer's tokens are different numbers.
    assert not torch.allclose(ours, comfy_out["last_hidden_state"].float(), atol=1e-3)
    # Both sides describe themselves the same way, so a hypernetwork file accepts both.
    hf_spec, comfy_spec = hf.spec, comfy["pack"].nodes.comfy_vision.connected_encoder_spec(clip_vision)
    assert hf_spec.mismatch(comfy_spec) is None and comfy_spec.mismatch(hf_spec) is None
    assert (hf_spec.hidden_size, hf_spec.num_tokens, hf_spec.image_size) == (32, 17, 56)


def test_different_weights_give_different_features(encoders, comfy):
    from devtools import tiny_vision

    _, hf = encoders
    other = tiny_vision.comfy_clip_vision(seed=4)
    with torch.inference_mode():
        theirs = other.encode_image(photos(), crop=True)["penultimate_hidden_states"].float()
    assert not torch.allclose(hf.encode(photos()), theirs, atol=1e-3)


def test_vit_h_spec_matches_the_published_config():
    from transformers import CLIPVisionConfig

    cfg = CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_attention_heads=16, num_hidden_layers=32,
                           image_size=224, patch_size=14, projection_dim=1024)
    assert spec_from_hf_config(cfg).mismatch(VIT_H_14) is None


def test_encoder_mismatch_is_one_sentence():
    vit_l = EncoderSpec(hidden_size=1024, num_tokens=257, name="CLIP-ViT-L-14")
    with pytest.raises(HDBError) as e:
        VIT_H_14.check(vit_l)
    msg = str(e.value)
    assert "hidden size 1024" in msg and "CLIP-ViT-H-14" in msg and "\n" not in msg and msg.endswith(".")
    other_norm = EncoderSpec(image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
    assert "mean/std" in VIT_H_14.mismatch(other_norm)


def test_empty_or_malformed_image_batches_are_refused():
    spec = EncoderSpec(image_size=56)
    with pytest.raises(HDBError, match="empty"):
        preprocess(torch.zeros(0, 64, 64, 3), spec)
    with pytest.raises(HDBError, match=r"\[N, H, W, 3\]"):
        preprocess(torch.zeros(64, 64, 3), spec)


def test_a_local_folder_loads_in_the_asked_dtype_with_the_keyword_transformers_expects(tiny_model, monkeypatch):
    """transformers 4.56 renamed `torch_dtype` to `dtype` and logs a deprecation on every load of the old one."""
    import os

    import transformers
    from packaging.version import Version

    keywords = []
    load = transformers.CLIPVisionModel.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        keywords.extend(kwargs)
        return load(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.CLIPVisionModel, "from_pretrained", classmethod(spy))
    encoder = ClipImageEncoder.from_pretrained(os.path.join(tiny_model, "image_encoder"), dtype=torch.bfloat16)
    assert {p.dtype for p in encoder.model.parameters()} == {torch.bfloat16}
    renamed = Version(transformers.__version__) >= Version("4.56")
    assert ("dtype" in keywords, "torch_dtype" in keywords) == (renamed, not renamed)
