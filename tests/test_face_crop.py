"""HDB_FaceCrop on a real photograph (scikit-image's astronaut) and on images without a face.

Where the face ended up is checked with a second, independent detector: the LBP
cascade that scikit-image ships (a different model, different library), so the
tests do not grade OpenCV's detector with its own answer.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data
from skimage.feature import Cascade

from hdb_core.errors import HDBError
from hdb_core.face_detect import detect_faces, face_crop


def _astronaut() -> torch.Tensor:
    return torch.from_numpy(data.astronaut()).float().div(255)


def _skimage_faces(image: torch.Tensor, min_frac=0.1, max_frac=0.9) -> list[dict]:
    """Faces found by scikit-image's own LBP cascade in [H, W, 3] (0..1), largest first."""
    arr = (image[..., :3].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    side = min(arr.shape[:2])
    found = Cascade(data.lbp_frontal_face_cascade_filename()).detect_multi_scale(
        img=arr, scale_factor=1.15, step_ratio=1,
        min_size=(int(side * min_frac),) * 2, max_size=(int(side * max_frac),) * 2)
    return sorted(found, key=lambda f: f["width"] * f["height"], reverse=True)


def _centre(face: dict) -> tuple[float, float]:
    return face["c"] + face["width"] / 2, face["r"] + face["height"] / 2


@pytest.fixture(scope="module")
def astronaut():
    return _astronaut()


def test_crop_is_centred_on_the_face_with_the_requested_margin(astronaut):
    original = astronaut.clone()
    out = face_crop(astronaut[None], margin=0.5, size=384)
    assert out.shape == (1, 384, 384, 3) and out.dtype == astronaut.dtype
    assert 0 <= out.min() and out.max() <= 1
    assert torch.equal(astronaut, original), "the input image was modified"

    faces = _skimage_faces(out[0])
    assert faces, "the independent detector finds no face in the crop"
    cx, cy = _centre(faces[0])
    # A centred face: within 10% of the side from the middle.
    assert abs(cx - 192) < 0.1 * 384 and abs(cy - 192) < 0.1 * 384, (cx, cy)
    # margin 0.5 means the face box is about half of the square (detectors differ by ~20%).
    ratio = faces[0]["width"] / 384
    assert 0.35 < ratio < 0.7, ratio


def test_larger_margin_shows_more_around_the_face(astronaut):
    tight = face_crop(astronaut[None], margin=0.25, size=256)[0]
    loose = face_crop(astronaut[None], margin=1.0, size=256)[0]
    w_tight = _skimage_faces(tight)[0]["width"]
    w_loose = _skimage_faces(loose)[0]["width"]
    # Square sides 1.5x vs 3x the face: the face shrinks about 2x in the output.
    assert 1.5 < w_tight / w_loose < 2.6, (w_tight, w_loose)


def test_face_near_a_corner_is_kept_whole(astronaut):
    # Cut the photo so the face sits in the top-left corner: the square must shift or pad, not lose it.
    corner = astronaut[50:, 160:].contiguous()
    for margin in (0.5, 2.0):  # 2.0: the square (5x the face) is larger than the image, so it is padded
        out = face_crop(corner[None], margin=margin, size=256)[0]
        assert out.shape == (256, 256, 3)
        faces = _skimage_faces(out, min_frac=0.08)
        assert faces, f"face lost at margin {margin}"


def test_padding_replicates_the_border_instead_of_inventing_black(astronaut):
    out = face_crop(astronaut[None], margin=3.0, size=256)[0]  # square 7x the face: larger than the photo
    assert _skimage_faces(out, min_frac=0.05)
    # The top rows come from the photo's top edge (replicated), not zeros.
    assert out[0].mean() > 0.05
    assert torch.allclose(out[0], out[1], atol=0.05)


def test_largest_face_wins(astronaut):
    small = torch.nn.functional.interpolate(astronaut.permute(2, 0, 1)[None], size=(256, 256),
                                            mode="area")[0].permute(1, 2, 0)
    canvas = torch.zeros(512, 768, 3)
    canvas[:, :512] = astronaut
    canvas[:256, 512:] = small
    faces = detect_faces(canvas)
    assert len(faces) >= 2, "both faces should be visible to the detector"
    assert faces[0].x + faces[0].w < 512 and faces[-1].x >= 512, "largest-first order"
    from_canvas = face_crop(canvas[None], margin=0.5, size=128)[0]
    from_big = face_crop(astronaut[None], margin=0.5, size=128)[0]
    from_small = face_crop(small[None], margin=0.5, size=128)[0]
    assert (from_canvas - from_big).abs().mean() < (from_canvas - from_small).abs().mean()


@pytest.mark.parametrize("channels", [1, 4])
def test_grey_and_rgba_images(astronaut, channels):
    img = astronaut.mean(-1, keepdim=True) if channels == 1 else torch.cat([astronaut, torch.ones(512, 512, 1)], -1)
    out = face_crop(img[None], margin=0.5, size=128)
    assert out.shape == (1, 128, 128, channels)


@pytest.mark.parametrize("kind", ["flat", "noise", "cat", "coffee"])
def test_no_face_is_a_clear_error(kind):
    if kind == "flat":
        img = torch.full((256, 320, 3), 0.6)
    elif kind == "noise":
        img = torch.rand(384, 384, 3, generator=torch.Generator().manual_seed(1))
    else:
        img = torch.from_numpy(getattr(data, "chelsea" if kind == "cat" else kind)()).float().div(255)
    with pytest.raises(HDBError, match=r"No face found in image 1 of 1 in the batch"):
        face_crop(img[None])


def test_error_names_the_faceless_image_in_a_batch(astronaut):
    batch = torch.stack([astronaut, astronaut, torch.full_like(astronaut, 0.3)])
    with pytest.raises(HDBError, match=r"image 3 of 3 in the batch \(index 2\)"):
        face_crop(batch)


def test_bad_arguments_are_clear_errors(astronaut):
    with pytest.raises(HDBError, match="IMAGE batch"):
        face_crop(astronaut)  # missing batch dimension
    with pytest.raises(HDBError, match="margin"):
        face_crop(astronaut[None], margin=-0.1)


def test_node_in_the_real_executor(comfy, node):
    """LoadImage -> HDB_FaceCrop -> PreviewImage through ComfyUI's executor, and the schema contract."""
    from devtools.comfy_runtime import run_prompt

    schema = node("HDB_FaceCrop").GET_SCHEMA()
    assert [i.id for i in schema.inputs] == ["image", "margin", "size"]
    assert all(i.tooltip for i in schema.inputs)

    input_dir = comfy["folder_paths"].get_input_directory()
    Image.fromarray(data.astronaut()).save(os.path.join(input_dir, "hdb_astronaut.png"))
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "hdb_astronaut.png"}},
        "2": {"class_type": "HDB_FaceCrop", "inputs": {"image": ["1", 0], "margin": 0.5, "size": 256}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
    }
    result = run_prompt(prompt)
    assert result.success, result.error
    (crop,) = result.node_output("2")
    assert crop.shape == (1, 256, 256, 3)
    assert _skimage_faces(crop[0])

    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(os.path.join(input_dir, "hdb_flat.png"))
    prompt["1"]["inputs"]["image"] = "hdb_flat.png"
    result = run_prompt(prompt)
    assert not result.success
    assert "No face found in image 1 of 1" in result.error["exception_message"]
