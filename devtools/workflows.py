"""The example workflows: one spec per graph -> UI-format file (templates) + API-format twin (tests, demo).

ComfyUI lists `workflows/*.json` of a custom node folder as templates; those must be in the UI
(LiteGraph) format. The API twins live in `workflows/api/` (not listed as templates) and are what
the tests and the demo execute. Widget order and defaults come from the running ComfyUI's
INPUT_TYPES, so the files always match the nodes as registered.

Rebuild after changing a node or a graph: `.venv/bin/python scripts/build_workflows.py`.
"""
from __future__ import annotations

import json
import os

from hdb_core import defaults

from .comfy_runtime import REPO

WORKFLOW_DIR = os.path.join(REPO, "workflows")
API_DIR = os.path.join(WORKFLOW_DIR, "api")

# Files a user supplies; the demo and tests substitute tiny stand-ins (see devtools/demo.py).
CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
CLIP_VISION = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
HYPERNET = "hyperdreambooth_sd15.safetensors"
PHOTO = "face.png"
STYLE_LORA = "your_style_lora.safetensors"
LIDB = "identity_00001_.safetensors"
# Flux.1 dev as ComfyUI's Flux templates load it (diffusion model, two text encoders, VAE).
FLUX_MODEL = "flux1-dev.safetensors"
FLUX_CLIP_L = "clip_l.safetensors"
FLUX_T5 = "t5xxl_fp16.safetensors"
FLUX_VAE = "ae.safetensors"


def _sampling(model, clip, vae, prompt, prefix, first_id=20):
    i = first_id
    return {
        str(i): {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": clip}, "title": "Prompt"},
        str(i + 1): {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry, lowres", "clip": clip},
                     "title": "Negative prompt"},
        str(i + 2): {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        str(i + 3): {"class_type": "KSampler", "inputs": {"model": model, "positive": [str(i), 0],
                                                          "negative": [str(i + 1), 0], "latent_image": [str(i + 2), 0],
                                                          "seed": 42, "steps": 25, "cfg": 7.0, "sampler_name": "euler",
                                                          "scheduler": "normal", "denoise": 1.0}},
        str(i + 4): {"class_type": "VAEDecode", "inputs": {"samples": [str(i + 3), 0], "vae": vae}},
        str(i + 5): {"class_type": "SaveImage", "inputs": {"images": [str(i + 4), 0], "filename_prefix": prefix}},
    }


def _personalise(with_hypernet: bool) -> dict:
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "2": {"class_type": "LoadImage", "inputs": {"image": PHOTO}, "title": "Your photo"},
        "3": {"class_type": "HDB_FaceCrop", "inputs": {"image": ["2", 0], "margin": 0.5, "size": 512}},
        "6": {"class_type": "HDB_FastFinetune",
              "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "image": ["3", 0],
                         **({"init_lidb": ["5", 0]} if with_hypernet else {}),
                         **({} if with_hypernet else {"steps": defaults.ZERO_START_STEPS})}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 1], "filename_prefix": "hyperdreambooth_loss"},
              "title": "Loss curve"},
        "8": {"class_type": "HDB_SaveLiDB", "inputs": {"lidb": ["6", 0], "filename_prefix": "identity"}},
        "9": {"class_type": "HDB_ExportLoRA", "inputs": {"lidb": ["6", 0], "filename_prefix": "identity"}},
        "10": {"class_type": "HDB_ApplyLiDB", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lidb": ["6", 0],
                                                         "strength_model": 1.0, "strength_clip": 1.0}},
    }
    if with_hypernet:
        g["4"] = {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": CLIP_VISION}}
        g["11"] = {"class_type": "HDB_LoadHyperNet", "inputs": {"hypernet_name": HYPERNET}}
        g["5"] = {"class_type": "HDB_PredictLiDBWeights",
                  "inputs": {"hypernet": ["11", 0], "clip_vision": ["4", 0], "image": ["3", 0]}}
    g.update(_sampling(["10", 0], ["10", 1], ["1", 2],
                       f"{defaults.TRIGGER} as a rock star, portrait photo, stage lights", "hyperdreambooth"))
    return g


def _reuse() -> dict:
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "2": {"class_type": "HDB_LoadLiDB", "inputs": {"lidb_name": LIDB}},
        "3": {"class_type": "HDB_ApplyLiDB", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lidb": ["2", 0],
                                                        "strength_model": 1.0, "strength_clip": 1.0}},
        "4": {"class_type": "LoraLoader", "inputs": {"model": ["3", 0], "clip": ["3", 1], "lora_name": STYLE_LORA,
                                                     "strength_model": 0.8, "strength_clip": 0.8},
              "title": "Style LoRA"},
    }
    g.update(_sampling(["4", 0], ["4", 1], ["1", 2],
                       f"an oil painting of {defaults.TRIGGER}, in the style of the LoRA", "hyperdreambooth_reuse"))
    return g


def _flux_personalise() -> dict:
    """Flux.1: one photo -> finetune from zero -> images, LiDB, LoRA (no Flux hypernetwork exists)."""
    g = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": FLUX_MODEL}},
        "2": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": FLUX_CLIP_L, "clip_name2": FLUX_T5,
                                                         "type": "flux"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": FLUX_VAE}},
        "4": {"class_type": "LoadImage", "inputs": {"image": PHOTO}, "title": "Your photo"},
        "5": {"class_type": "HDB_FaceCrop", "inputs": {"image": ["4", 0], "margin": 0.5, "size": 512}},
        "6": {"class_type": "HDB_FastFinetune",
              "inputs": {"model": ["1", 0], "clip": ["2", 0], "vae": ["3", 0], "image": ["5", 0],
                         "steps": defaults.ZERO_START_STEPS}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 1], "filename_prefix": "hyperdreambooth_flux_loss"},
              "title": "Loss curve"},
        "8": {"class_type": "HDB_SaveLiDB", "inputs": {"lidb": ["6", 0], "filename_prefix": "identity_flux"}},
        "9": {"class_type": "HDB_ExportLoRA", "inputs": {"lidb": ["6", 0], "filename_prefix": "identity_flux"}},
        "10": {"class_type": "HDB_ApplyLiDB", "inputs": {"model": ["1", 0], "clip": ["2", 0], "lidb": ["6", 0],
                                                         "strength_model": 1.0, "strength_clip": 1.0}},
        "20": {"class_type": "CLIPTextEncode", "title": "Prompt",
               "inputs": {"text": f"{defaults.TRIGGER} as a rock star, portrait photo, stage lights",
                          "clip": ["10", 1]}},
        "21": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["20", 0], "guidance": 3.5}},
        "22": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["10", 1]},
               "title": "Negative prompt (unused at cfg 1)"},
        "23": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
        "24": {"class_type": "KSampler", "inputs": {"model": ["10", 0], "positive": ["21", 0], "negative": ["22", 0],
                                                    "latent_image": ["23", 0], "seed": 42, "steps": 20, "cfg": 1.0,
                                                    "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "25": {"class_type": "VAEDecode", "inputs": {"samples": ["24", 0], "vae": ["3", 0]}},
        "26": {"class_type": "SaveImage", "inputs": {"images": ["25", 0], "filename_prefix": "hyperdreambooth_flux"}},
    }
    return g


GRAPHS = {
    "1_photo_to_identity_with_hypernet": ("One photo -> hypernet prediction -> fast finetune -> images, LiDB, LoRA",
                                          lambda: _personalise(True)),
    "2_photo_to_identity_no_hypernet": ("One photo -> finetune from zero (Lightweight DreamBooth) "
                                        "-> images, LiDB, LoRA",
                                        lambda: _personalise(False)),
    "3_reuse_identity_with_style_lora": ("A saved identity (LiDB) combined with any style LoRA",
                                         _reuse),
    "4_flux_photo_to_identity": ("Flux.1: one photo -> finetune from zero -> images, LiDB, LoRA",
                                 _flux_personalise),
}


# ---------------------------------------------------------------------------------------------
def _input_specs(node_cls) -> list[tuple[str, object, dict]]:
    info = node_cls.INPUT_TYPES()
    out = []
    for section in ("required", "optional"):
        for name, spec in info.get(section, {}).items():
            out.append((name, spec[0], spec[1] if len(spec) > 1 else {}))
    return out


def _is_widget(kind) -> bool:
    return isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def to_api(spec: dict, mappings: dict) -> dict:
    """Full API prompt: every widget input present (defaults filled in from INPUT_TYPES)."""
    api = {}
    for nid, n in spec.items():
        cls = mappings[n["class_type"]]
        inputs = {}
        for name, kind, opts in _input_specs(cls):
            if name in n["inputs"]:
                inputs[name] = n["inputs"][name]
            elif _is_widget(kind) and "default" in opts:
                inputs[name] = opts["default"]
            elif _is_widget(kind) and isinstance(kind, list) and kind:
                inputs[name] = kind[0]
        unknown = set(n["inputs"]) - {s[0] for s in _input_specs(cls)}
        if unknown:
            raise ValueError(f"{n['class_type']} has no inputs {unknown}")
        api[nid] = {"class_type": n["class_type"], "inputs": inputs,
                    "_meta": {"title": n.get("title", n["class_type"])}}
    return api


def _depths(api: dict) -> dict[str, int]:
    depth: dict[str, int] = {}

    def d(nid):
        if nid not in depth:
            ups = [v[0] for v in api[nid]["inputs"].values() if isinstance(v, list) and len(v) == 2
                   and isinstance(v[0], str)]
            depth[nid] = 1 + max((d(u) for u in ups), default=-1)
        return depth[nid]

    for nid in api:
        d(nid)
    return depth


def to_ui(api: dict, mappings: dict) -> dict:
    """LiteGraph workflow (what the ComfyUI frontend saves and opens) for an API prompt."""
    depth = _depths(api)
    column_fill: dict[int, int] = {}
    links, nodes = [], []
    out_links: dict[tuple[str, int], list[int]] = {}
    order = sorted(api, key=lambda k: (depth[k], int(k)))
    for nid in order:
        for _name, v in api[nid]["inputs"].items():
            if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str):
                link_id = len(links) + 1
                src_cls = mappings[api[v[0]]["class_type"]]
                links.append([link_id, int(v[0]), v[1], int(nid), None, src_cls.RETURN_TYPES[v[1]]])
                out_links.setdefault((v[0], v[1]), []).append(link_id)
    link_by_target = {(l[3], name): l for nid in order for name in api[nid]["inputs"] for l in links
                      if l[3] == int(nid) and api[nid]["inputs"][name] == [str(l[1]), l[2]]}
    for pos, nid in enumerate(order):
        n = api[nid]
        cls = mappings[n["class_type"]]
        ins, widgets = [], []
        for name, kind, opts in _input_specs(cls):
            value = n["inputs"].get(name)
            link = link_by_target.get((int(nid), name))
            if link is not None:
                link[4] = len(ins)
                ins.append({"name": name, "type": link[5], "link": link[0]})
            elif not _is_widget(kind):
                ins.append({"name": name, "type": kind, "link": None})
            else:
                widgets.append(value)
                if opts.get("control_after_generate"):
                    widgets.append("fixed")
        outs = [{"name": (cls.RETURN_NAMES[i] if getattr(cls, "RETURN_NAMES", None) else t), "type": t,
                 "links": out_links.get((nid, i), []), "slot_index": i}
                for i, t in enumerate(cls.RETURN_TYPES)]
        col = depth[nid]
        row = column_fill.get(col, 0)
        height = 60 + 26 * (len(ins) + len(widgets))
        column_fill[col] = row + height + 40
        nodes.append({"id": int(nid), "type": n["class_type"], "pos": [40 + 380 * col, 40 + row],
                      "size": [340, height], "flags": {}, "order": pos, "mode": 0, "inputs": ins, "outputs": outs,
                      "title": n["_meta"]["title"], "properties": {"Node name for S&R": n["class_type"]},
                      "widgets_values": widgets})
    return {"last_node_id": max(int(k) for k in api), "last_link_id": len(links), "nodes": nodes,
            "links": links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


def thumbnail(ui: dict, title: str, path: str) -> None:
    """A small picture of the graph (boxes and wires) shown next to the template."""
    from PIL import Image, ImageDraw

    xs = [n["pos"][0] + n["size"][0] for n in ui["nodes"]]
    ys = [n["pos"][1] + n["size"][1] for n in ui["nodes"]]
    scale = min(480 / max(xs), 250 / max(ys))
    img = Image.new("RGB", (512, 288), (32, 34, 40))
    d = ImageDraw.Draw(img)
    box = {n["id"]: [16 + n["pos"][0] * scale, 30 + n["pos"][1] * scale,
                     16 + (n["pos"][0] + n["size"][0]) * scale, 30 + (n["pos"][1] + n["size"][1]) * scale]
           for n in ui["nodes"]}
    for _, src, _, dst, _, _ in ui["links"]:
        a, b = box[src], box[dst]
        d.line([a[2], (a[1] + a[3]) / 2, b[0], (b[1] + b[3]) / 2], fill=(120, 170, 230), width=2)
    for n in ui["nodes"]:
        ours = n["type"].startswith("HDB_")
        d.rectangle(box[n["id"]], fill=(70, 110, 80) if ours else (64, 66, 74), outline=(200, 200, 200))
    d.text((16, 8), title[:80], fill=(235, 235, 235))
    img.save(path, quality=90)


def build(mappings: dict, out_dir: str = WORKFLOW_DIR) -> list[str]:
    os.makedirs(os.path.join(out_dir, "api"), exist_ok=True)
    written = []
    for name, (title, make) in GRAPHS.items():
        api = to_api(make(), mappings)
        ui = to_ui(api, mappings)
        ui["extra"]["info"] = {"title": title}
        for path, obj in ((os.path.join(out_dir, f"{name}.json"), ui),
                          (os.path.join(out_dir, "api", f"{name}.json"), api)):
            with open(path, "w") as f:
                json.dump(obj, f, indent=1)
                f.write("\n")
            written.append(path)
        thumbnail(ui, title, os.path.join(out_dir, f"{name}.jpg"))
    return written
