"""`hdb prepare`: each usable photo is decoded, checked and encoded once (latents and image features of the
photo and its mirror), photos without a face are skipped and counted, and an interrupted run resumes."""
from __future__ import annotations

import os

import pytest
import torch

from hdb_core.errors import HDBError
from hdb_core.hypernet.image_encoder import ClipImageEncoder
from hdb_core.training.base_model import photo_latents
from hdb_core.training.data import prepare_image
from hdb_core.training.prepared import PreparedData, PrepareSettings, prepare, shard_name


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """id00: a wall and a face, id01: a face, id02: only a wall (skipped as an identity)."""
    from PIL import Image
    from skimage import data as skdata

    face = Image.fromarray(skdata.astronaut()).resize((256, 256))
    wall = Image.new("RGB", (256, 256), (120, 130, 140))
    root = tmp_path_factory.mktemp("faces")
    for ident, photos in {"id00": {"a_wall.png": wall, "b.png": face},
                          "id01": {"a.png": face.transpose(Image.FLIP_LEFT_RIGHT)},
                          "id02": {"a.png": wall}}.items():
        (root / ident).mkdir()
        for name, image in photos.items():
            image.save(root / ident / name)
    return str(root)


def test_prepare_encodes_once_skips_faceless_photos_and_resumes(faces, base, tiny_model, tmp_path):
    encoder = ClipImageEncoder.from_pretrained(os.path.join(tiny_model, "image_encoder"))
    settings = PrepareSettings(resolution=64, face_check="detect", min_size=32, shard_size=2, batch_size=2)
    out = str(tmp_path / "prepared")
    summary = prepare(faces, base, encoder, out, settings, progress=False)
    assert summary["identities"] == 2 and summary["photos"] == 2
    assert summary["skip_counts"] == {"no face found": 2, "identity without usable photos": 1}

    prepared = PreparedData(out)
    assert prepared.ids == ["id00", "id01"] and prepared.num_photos("id00") == 1
    image = prepare_image(os.path.join(faces, "id00", "b.png"), 64, "detect")
    with torch.no_grad():
        expected = encoder.encode(torch.stack([image, image.flip(1)]))
    torch.testing.assert_close(prepared.features("id00", 0, False), expected[0], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(prepared.features("id00", 0, True), expected[1], atol=2e-3, rtol=2e-3)
    assert not torch.allclose(expected[0], expected[1])         # the mirror is a different input
    torch.testing.assert_close(prepared.latents("id00", 0), photo_latents(base, image[None], "cpu", True)[0])

    # An interrupted run (shard 0 missing) redoes only that shard.
    second = os.path.join(out, shard_name(1))
    stamp = os.stat(second).st_mtime_ns
    os.unlink(os.path.join(out, shard_name(0)))
    again = prepare(faces, base, encoder, out, settings, progress=False)
    assert again["already_done"] == 1 and again["photos"] == 2 and again["identities"] == 2
    assert os.stat(second).st_mtime_ns == stamp
    torch.testing.assert_close(PreparedData(out).latents("id00", 0), prepared.latents("id00", 0))

    with pytest.raises(HDBError, match=r"prepared differently \(settings changed"):
        prepare(faces, base, encoder, out, PrepareSettings(resolution=128, face_check="detect", min_size=32,
                                                           shard_size=2), progress=False)
