"""Run the example workflows headlessly on tiny random-weight stand-ins (no downloads).

    .venv/bin/python -m devtools.demo [--out DIR]

Substitutes: CheckpointLoaderSimple -> a tiny SD1.5-architecture checkpoint, UNETLoader /
DualCLIPLoader / VAELoader -> the parts of a tiny Flux.1 checkpoint, CLIPVisionLoader ->
a tiny CLIP vision encoder, the hypernetwork file -> a randomly initialised one, the photo ->
scikit-image's astronaut. Everything else (nodes, executor, files written) is what a user runs.
The weights are random, so the pictures are noise: this shows the plumbing and the timings,
not likeness.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import torch

from hdb_core import defaults

from . import comfy_runtime, workflows

STAND_INS = {"CheckpointLoaderSimple": ("HDBDev_TinyCheckpoint", {"scale": "tiny", "seed": 0, "v_prediction": False}),
             "CLIPVisionLoader": ("HDBDev_TinyClipVision", {"seed": 0})}
# Loaders of one part of a DiT checkpoint -> the tiny Flux.1 checkpoint's output that stands in for that part.
DIT_PARTS = {"UNETLoader": 0, "DualCLIPLoader": 1, "VAELoader": 2}
TINY_ENCODER = dict(hidden_size=32, num_tokens=17, image_size=56, name="tiny CLIP vision (dev)")


def fast_settings(api: dict, finetune_steps: int = 12) -> dict:
    """Same graph, tiny-model sizes: small images, few sampler and finetune steps."""
    api = json.loads(json.dumps(api))
    part = {nid: DIT_PARTS[n["class_type"]] for nid, n in api.items() if n["class_type"] in DIT_PARTS}
    for n in api.values():
        for name, v in n["inputs"].items():           # rewire to the stand-in's MODEL / CLIP / VAE output
            if isinstance(v, list) and len(v) == 2 and v[0] in part:
                n["inputs"][name] = [v[0], part[v[0]]]
    for nid, n in api.items():
        ins = n["inputs"]
        if nid in part:
            n["class_type"], n["inputs"] = "HDBDev_TinyDiTCheckpoint", {"family": "flux1", "seed": 0}
        elif n["class_type"] in STAND_INS:
            n["class_type"], n["inputs"] = STAND_INS[n["class_type"]][0], dict(STAND_INS[n["class_type"]][1])
        elif n["class_type"] in ("EmptyLatentImage", "EmptySD3LatentImage"):
            ins.update(width=64, height=64)
        elif n["class_type"] == "KSampler":
            ins.update(steps=4)
        elif n["class_type"] == "HDB_FaceCrop":
            ins.update(size=128)
        elif n["class_type"] == "HDB_FastFinetune":
            ins.update(resolution=64, steps=finetune_steps)
    return api


def prepare_stand_ins(state: dict) -> None:
    """The files a user would supply: the photo, a hypernetwork, a style LoRA."""
    from PIL import Image
    from skimage.data import astronaut

    from . import tiny_models

    fp = state["folder_paths"]
    import hdb_core as hdb
    Image.fromarray(astronaut()).save(os.path.join(fp.get_input_directory(), workflows.PHOTO))
    model, clip = tiny_models.comfy_model("tiny"), tiny_models.comfy_clip("tiny")
    ct = state["pack"].nodes.comfy_targets
    layers = [t.spec for t in ct.unet_targets(model).values()] + [t.spec for t in ct.clip_targets(clip).values()]
    torch.manual_seed(0)
    net = hdb.HyperNetwork(hdb.HyperNetConfig(width=32, depth=1, heads=2, iterations=4), layers,
                                    hdb.LiDBConfig(), hdb.EncoderSpec(**TINY_ENCODER))
    net.base_model = "tiny random SD1.5-architecture model (dev)"
    hn_dir = fp.get_folder_paths("hyperdreambooth")[0]
    os.makedirs(hn_dir, exist_ok=True)
    hdb.save_hypernet(net, os.path.join(hn_dir, workflows.HYPERNET), {"trigger": defaults.TRIGGER})
    g = torch.Generator().manual_seed(1)
    style = hdb.LiDB.zeros(layers, hdb.LiDBConfig(rank=4, seed=99))
    style = style.with_tensors({k: torch.randn(v.shape, generator=g) * 0.05 for k, v in style.a_train.items()},
                               {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in style.b_train.items()})
    lora_dir = fp.get_folder_paths("loras")[0]
    os.makedirs(lora_dir, exist_ok=True)
    hdb.save_kohya(style, os.path.join(lora_dir, workflows.STYLE_LORA))


def load_api(name: str) -> dict:
    with open(os.path.join(workflows.API_DIR, f"{name}.json")) as f:
        return json.load(f)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(comfy_runtime.REPO, "demo-output"),
                    help="ComfyUI base folder for this run (models/, input/, output/); recreated")
    ap.add_argument("--finetune-steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads; tiny models are overhead-bound, so 1 is fastest and steadiest")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    shutil.rmtree(args.out, ignore_errors=True)
    t0 = time.monotonic()
    state = comfy_runtime.boot(os.path.abspath(args.out))
    print(f"[demo] ComfyUI booted with the pack in {time.monotonic() - t0:.1f} s")
    prepare_stand_ins(state)
    ok = True
    for name in ("1_photo_to_identity_with_hypernet", "3_reuse_identity_with_style_lora"):
        api = fast_settings(load_api(name), args.finetune_steps)
        t = time.monotonic()
        result = comfy_runtime.run_prompt(api)
        print(f"\n[demo] workflow {name}: {'ok' if result.success else 'FAILED'} in {time.monotonic() - t:.1f} s")
        for nid, sec in result.node_seconds().items():
            print(f"    {api[nid]['_meta']['title']:<28} {api[nid]['class_type']:<24} {sec:7.2f} s")
        if not result.success:
            print("    error:", (result.error or {}).get("exception_message"))
            ok = False
    out = state["folder_paths"].get_output_directory()
    print("\n[demo] files written:")
    for root in (out, state["folder_paths"].get_folder_paths("loras")[0]):
        for dirpath, _, files in os.walk(root):
            for f in sorted(files):
                p = os.path.join(dirpath, f)
                print(f"    {os.path.relpath(p, args.out):<60} {os.path.getsize(p):>9} bytes")
    print("[demo] the models are random, so the images are noise; see README for real checkpoints.")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
