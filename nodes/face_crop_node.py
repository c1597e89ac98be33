"""HDB_FaceCrop: frame any photo the way HyperDreamBooth expects (square, face centred)."""
from __future__ import annotations

from comfy_api.latest import io

from hdb_core.face_detect import face_crop
from .comfy_runtime import check_interrupt, progress_bar
from .types import CATEGORY


class FaceCrop(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HDB_FaceCrop",
            display_name="Face Crop (HyperDreamBooth)",
            category=CATEGORY,
            description="Find the largest face in each image, cut a square around it with some margin and "
                        "resize it. Uses OpenCV's built-in face detector: no insightface, nothing to download.",
            inputs=[
                io.Image.Input("image", tooltip="One photo (or a batch); each must show a clear frontal face."),
                io.Float.Input("margin", default=0.5, min=0.0, max=3.0, step=0.05,
                               tooltip="Room around the detected face on each side, as a fraction of the face "
                                       "size: 0.5 makes the square twice the face (head and some hair)."),
                io.Int.Input("size", default=512, min=64, max=4096, step=8,
                             tooltip="Side of the square output in pixels; 512 suits SD1.5."),
            ],
            outputs=[io.Image.Output(display_name="IMAGE")],
        )

    @classmethod
    def execute(cls, image, margin=0.5, size=512) -> io.NodeOutput:
        progress, done = progress_bar(), [0]

        def step():
            check_interrupt()
            done[0] += 1
            progress(done[0], image.shape[0])

        return io.NodeOutput(face_crop(image, margin=margin, size=size, on_image=step))


NODES = [FaceCrop]
