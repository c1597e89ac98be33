"""A toy world whose identities are known exactly: tiny SD model, teacher LiDBs, generated "photos".

* Base model: the tiny SD1-architecture diffusers model of `devtools.tiny_diffusers`
  (random text encoder), made a v-prediction model and its UNet pre-trained as a
  real denoiser of a simple latent family ("faces": one shared template plus a
  few smooth variations), saved as a normal diffusers folder so the `hdb`
  pipeline loads it like any user's model. A random UNet is no denoiser at all,
  so the model that generated a photo need not be the best denoiser of it, and
  the diffusion loss then teaches only the photos' common look (the first
  version of this world). It is pre-trained on four prompts: "a face" and "a sks face"
  mean a face of the family, the same prompts + " in red" mean that face plus a
  fixed known direction (`style_direction`), so a LiDB's editability (how much of
  the edit survives it) and prior drift ("a face" moving) can be measured.
  Pre-trained weights are cached under bench/out/pretrained.
* The VAE: a random decoder, scaled so images stay inside 0..1, with an encoder
  trained briefly to invert it through 8-bit PNG quantisation. Then what the
  pipeline encodes from a photo is (almost) exactly the latent that was sampled,
  so "the identity in the photo" and "the teacher's samples" are the same thing.
* Identities: teacher LiDB i is nonzero only on the cross-attention value
  projections (`teacher_layers`; residuals on self-attention or on the unused
  text encoder either scatter this tiny model's samples or do nothing) and has
  A_train = M_A u_i + noise, B_train = M_B v_i + noise
  for a hidden code z_i = (u_i, v_i) in R^2k (one fixed random linear map per
  layer), so identities form a low-dimensional family a hypernetwork can
  generalise over, and the mean teacher dW is zero (no shared "look" to learn).
* Photos: latents sampled with DDIM from base + teacher i, each from its own
  independent start noise (no noise shared between photos), decoded to 64x64
  PNGs, one folder per identity (the layout `hdb` expects). Teachers are large
  enough that two photos of one identity are much closer than photos of two
  identities (the ratio is measured and printed by the bench).
* Gallery: `gallery` more teacher samples per identity (own seeds), the data the
  identity recognizer of `identity.py` is fit on (training identities only) and
  the class means it identifies against (all identities).
* Image encoder: a tiny transformers CLIP vision model with frozen random weights.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from functools import partial

import numpy as np
import torch

from hdb_core.training.base_model import BaseModel, load_base_model, tokenize
from hdb_core.lidb.batch import lidb_factors
from hdb_core.training.injector import LowRankInjector
from hdb_core.lidb.weights import LiDB, LiDBConfig
from hdb_core.training.seeding import generator

from .workers import in_background, in_workers

PROMPT = "a sks face"
FACE_PROMPT = "a face"
STYLE_SUFFIX = " in red"     # the base learns this as adding `style_direction` to a face
IMAGE_SIZE = 64


@dataclass
class WorldSpec:
    identities: int = 200
    held_out: int = 8
    photos: int = 4              # per identity (held-out identities: 1 input photo + the rest for evaluation)
    code_dim: int = 6            # k: dimension of each half of the hidden identity code z
    teacher_scale: float = 10.0  # size of the teacher's A/B entries
    teacher_layers: str = "attn2.to_v"  # the teacher's dW is nonzero only on layers whose name contains this
    teacher_noise: float = 0.1   # per-identity deviation from the low-dimensional family
    family_variation: float = 0.05  # size of the base family's smooth variations around the template
    pretrain_steps: int = 600    # denoiser pre-training of the base UNet (batch 64)
    sample_steps: int = 10       # DDIM steps per photo
    vae_steps: int = 1500        # encoder-inversion training steps
    gallery: int = 16            # teacher samples per identity for the recognizer
    style_norm: float = 6.0      # length of the style direction " in red" adds (two identities: ~10 apart)
    seed: int = 0
    extra_train: int = 0         # more training identities: photos for stage 0 and 1 only, no gallery

    def ids(self) -> tuple[list[str], list[str]]:
        names = [f"id{i:04d}" for i in range(self.identities)]
        return names[: self.identities - self.held_out], names[self.identities - self.held_out:]

    def extra_ids(self) -> list[str]:
        return [f"id{i:04d}" for i in range(self.identities, self.identities + self.extra_train)]


FAMILY_BASIS = 6
PRETRAIN_BATCH = 64
PRETRAIN_LR = 2e-3
PRETRAIN_CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "out", "pretrained")


def family(n: int, g: torch.Generator, spec: WorldSpec) -> torch.Tensor:
    """n latents [n, 4, 8, 8] of the base model's world: template + smooth variations + a little pixel noise."""
    import torch.nn.functional as F

    gf = generator(spec.seed, "family")
    smooth = F.interpolate(torch.randn(1 + FAMILY_BASIS, 4, 4, 4, generator=gf), size=(8, 8), mode="bilinear",
                           align_corners=False)
    smooth = smooth / smooth.flatten(1).std(1).view(-1, 1, 1, 1)
    template, basis = smooth[0], smooth[1:]
    c = spec.family_variation * torch.randn(n, FAMILY_BASIS, generator=g)
    return template + torch.einsum("nk,kchw->nchw", c, basis) + 0.05 * torch.randn(n, 4, 8, 8, generator=g)


def style_direction(spec: WorldSpec) -> torch.Tensor:
    """The known edit [4, 8, 8]: prompts ending in STYLE_SUFFIX mean `family` + this (smooth, fixed length)."""
    import torch.nn.functional as F

    d = F.interpolate(torch.randn(1, 4, 4, 4, generator=generator(spec.seed, "style")), size=(8, 8),
                      mode="bilinear", align_corners=False)[0]
    return d * (spec.style_norm / d.norm())


PRETRAIN_PROMPTS = (FACE_PROMPT, PROMPT, FACE_PROMPT + STYLE_SUFFIX, PROMPT + STYLE_SUFFIX)


def pretrain_unet(unet, text_encoder, tokenizer, scheduler, spec: WorldSpec, log=print) -> float:
    """Train the UNet (all weights) as a denoiser of `family`; cached by settings. Returns seconds spent.

    Plain prompts ("a face", "a sks face") mean a face of the family, styled ones (+ " in red")
    the same face plus `style_direction`: editability is how much of that edit a LiDB leaves.
    """
    import time

    from safetensors.torch import load_file, save_file

    from hdb_core.atomic import write_atomic

    key = (f"unet-s{spec.seed}-f{spec.family_variation:g}-n{spec.pretrain_steps}-b{PRETRAIN_BATCH}"
           f"-style{spec.style_norm:g}-v2.safetensors")
    path = os.path.join(PRETRAIN_CACHE, key)
    if os.path.exists(path):
        unet.load_state_dict(load_file(path))
        return 0.0
    t0 = time.time()
    ids = tokenizer(list(PRETRAIN_PROMPTS), padding="max_length", max_length=77, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        contexts = text_encoder(ids)[0]
    styled = torch.tensor([p.endswith(STYLE_SUFFIX) for p in PRETRAIN_PROMPTS])
    style = style_direction(spec)
    unet.train().requires_grad_(True)
    opt = torch.optim.AdamW(unet.parameters(), lr=PRETRAIN_LR, weight_decay=0.0)
    g = generator(spec.seed, "pretrain")
    T = scheduler.config.num_train_timesteps
    loss = torch.zeros(())
    for step in range(spec.pretrain_steps):
        lr = PRETRAIN_LR * min(1.0, (step + 1) / 50) * 0.5 * (1 + np.cos(np.pi * step / spec.pretrain_steps))
        for group in opt.param_groups:
            group["lr"] = lr
        which = torch.randint(len(PRETRAIN_PROMPTS), (PRETRAIN_BATCH,), generator=g)
        context = contexts[which]
        x = family(PRETRAIN_BATCH, g, spec) + styled[which].view(-1, 1, 1, 1) * style
        noise = torch.randn(x.shape, generator=g)
        t = torch.randint(T, (PRETRAIN_BATCH,), generator=g)
        pred = unet(scheduler.add_noise(x, noise, t), t, context).sample
        loss = (pred - scheduler.get_velocity(x, noise, t)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    unet.eval().requires_grad_(False)
    os.makedirs(PRETRAIN_CACHE, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in unet.state_dict().items()}
    write_atomic(path, lambda tmp: save_file(state, tmp))
    log(f"world: base UNet pre-trained as a denoiser ({spec.pretrain_steps} steps, "
        f"final loss {float(loss.detach()):.4f}, "
        f"{time.time() - t0:.0f} s; cached in {path})")
    return time.time() - t0


def _save_base(folder: str, spec: WorldSpec, log=print) -> None:
    from devtools import tiny_diffusers
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    unet, vae, text_encoder, tokenizer, scheduler, image_encoder = tiny_diffusers.build("tiny", spec.seed)
    # v-prediction: an eps-model this small is badly wrong at high noise levels, so its samples miss its own data.
    scheduler = DDPMScheduler.from_config(scheduler.config, prediction_type="v_prediction")
    vae.register_to_config(scaling_factor=1.0)
    pretrain_unet(unet, text_encoder, tokenizer, scheduler, spec, log)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)


def save_image_encoder(folder: str, seed: int, patch_size: int = 16, width: int = 64, layers: int = 2) -> None:
    """The world's frozen random CLIP vision encoder (`patch_size` 16: 4 x 4 patch tokens of a photo)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed + 7)
    cfg = CLIPVisionConfig(hidden_size=width, intermediate_size=2 * width, num_attention_heads=2,
                           num_hidden_layers=layers, projection_dim=32, image_size=IMAGE_SIZE, patch_size=patch_size)
    CLIPVisionModelWithProjection(cfg).eval().save_pretrained(folder, safe_serialization=True)


def hidden_code(spec: WorldSpec, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
    """Identity `name`'s hidden code (u, v), and its generator positioned for the teacher's own noise."""
    gi = generator(spec.seed, "teacher", name)
    u = torch.randn(spec.code_dim, generator=gi)
    v = torch.randn(spec.code_dim, generator=gi)
    return u, v, gi


def teachers(layers, config: LiDBConfig, spec: WorldSpec, names: list[str]) -> list[LiDB]:
    """Teacher LiDBs from hidden codes (u_i, v_i) through one fixed random linear map per layer (mean dW 0)."""
    g = generator(spec.seed, "teacher-maps")
    maps = {}
    for s in layers:
        a_l, b_l = config.layer_dims(s)
        maps[s.name] = (torch.randn(a_l, spec.code_dim, generator=g) / spec.code_dim ** 0.5,
                        torch.randn(b_l, spec.code_dim, generator=g) / spec.code_dim ** 0.5)
    out = []
    for name in names:
        u, v, gi = hidden_code(spec, name)
        a, b = {}, {}
        for s in layers:
            ma, mb = maps[s.name]
            a_l, b_l = config.layer_dims(s)
            a[s.name] = (spec.teacher_scale * (ma @ u + spec.teacher_noise * torch.randn(a_l, generator=gi))
                         / a_l ** 0.5).unsqueeze(1)
            if spec.teacher_layers not in s.name:
                a[s.name] = torch.zeros_like(a[s.name])
            b[s.name] = (spec.teacher_scale * (mb @ v + spec.teacher_noise * torch.randn(b_l, generator=gi))
                         / b_l ** 0.5).unsqueeze(0)
        out.append(LiDB(tuple(layers), config, a, b, {"source": "random", "trigger": "sks"}))
    return out


@torch.no_grad()
def sample(base: BaseModel, injector: LowRankInjector, weights, seeds: list[str], spec: WorldSpec,
           scale: float = 1.0, prompt: str = PROMPT) -> torch.Tensor:
    """Latents [N, 4, 8, 8] sampled with DDIM (no guidance) from base + residual per seed.

    `weights`: None (bare base), a list of LiDBs (one per seed) or LoRA factors
    {name: (down, up)} of one LiDB (the same for every seed).

    Every seed has its own independent start noise (nothing is shared between
    photos), so photos of one identity differ only through the model's own
    sample variation. `scale` multiplies
    the result (1 in this world: the base was trained on latents of this size).
    """
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(base.noise_scheduler.config)
    sched.set_timesteps(spec.sample_steps)
    x = torch.stack([torch.randn(4, 8, 8, generator=generator("sample", s)) for s in seeds])
    if weights is None:
        injector.clear()
    elif isinstance(weights, dict):
        injector.set_factors(weights)
    else:
        injector.set_factors(lidb_factors(weights))
    context = base.text_encoder(tokenize(base, [prompt] * len(seeds), "cpu"))[0]
    for t in sched.timesteps:
        eps = base.unet(x, t, context).sample
        x = sched.step(eps, t, x).prev_sample
    injector.clear()
    return x * scale


def _train_encoder(base: BaseModel, latents: torch.Tensor, steps: int, seed: int) -> float:
    """Fit the VAE encoder to invert the (frozen, random) decoder through PNG quantisation.

    Trained on the world's own latents plus a little noise, with a cosine-decayed
    learning rate; returns the relative round-trip error on the latents themselves.
    """
    vae = base.vae
    with torch.no_grad():      # decoder output scaled so images use most of 0..1 without clipping
        std = vae.decode(latents[:64]).sample.std()
        vae.decoder.conv_out.weight.mul_(0.3 / std)
        vae.decoder.conv_out.bias.mul_(0.3 / std)
    enc_params = [*vae.encoder.parameters(), *vae.quant_conv.parameters()]
    for p in enc_params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(enc_params, lr=2e-3)
    g = generator(seed, "vae")
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = 2e-3 * min(1.0, (step + 1) / 50) * 0.5 * (1 + np.cos(np.pi * step / steps))
        idx = torch.randint(latents.shape[0], (32,), generator=g)
        z = latents[idx] + 0.1 * torch.randn(32, 4, 8, 8, generator=g)
        with torch.no_grad():
            img = to_png_range(vae.decode(z).sample)
        rec = vae.encode(img).latent_dist.mean
        loss = (rec - z).pow(2).mean() / z.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in enc_params:
        p.requires_grad_(False)
    return round_trip_error(base, latents)


@torch.no_grad()
def round_trip_error(base: BaseModel, latents: torch.Tensor) -> float:
    """Relative squared error of latent -> decoder -> 8-bit PNG -> encoder."""
    num = den = 0.0
    for i in range(0, latents.shape[0], 64):
        z = latents[i:i + 64]
        rec = base.vae.encode(to_png_range(base.vae.decode(z).sample)).latent_dist.mean
        num += float((rec - z).pow(2).sum())
        den += float(z.pow(2).sum())
    return num / den


def distance_ratio(per: torch.Tensor) -> tuple[float, float, float]:
    """per [N identities, P photos, D]: (mean sq distance of two photos of one identity, of two photos of two
    identities, sqrt of their ratio)."""
    n, k, _ = per.shape
    flat = per.reshape(n * k, -1)
    d = torch.cdist(flat, flat).pow(2).reshape(n, k, n, k)
    same = torch.eye(n, dtype=torch.bool)[:, None, :, None].expand(n, k, n, k)
    self_pair = torch.eye(n * k, dtype=torch.bool).reshape(n, k, n, k)
    within = float(d[same & ~self_pair].mean())
    between = float(d[~same].mean())
    return within, between, (within / between) ** 0.5


def to_png_range(pixels: torch.Tensor) -> torch.Tensor:
    """Model-range pixels -> what a PNG round trip gives back (clamped, 8-bit levels), in -1..1."""
    return (torch.round((pixels.clamp(-1, 1) + 1) * 127.5) / 127.5) - 1


def _write_png(path: str, pixels: torch.Tensor) -> None:
    from PIL import Image

    arr = ((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(np.ascontiguousarray(arr)).save(path)


WORLD_FOLDERS = ("base", "image_encoder", "photos", "held_out_photos", "teachers")
TEACHER_LATENTS = "teacher_latents.safetensors"


def load_teacher_latents(root: str) -> dict[str, torch.Tensor]:
    """The world's saved latents, identity-major, training identities first: every photo as sampled
    ("latents") and as the pipeline encodes its PNG ("encoded"), and the recognizer's "gallery"."""
    from safetensors.torch import load_file

    return load_file(os.path.join(root, TEACHER_LATENTS))


def read_manifest(root: str) -> dict:
    """The manifest of the world under `root`, its folders resolved under `root` (so a world folder can be
    copied or moved; world.json may name the folder it was first built in)."""
    with open(os.path.join(root, "world.json")) as f:
        manifest = json.load(f)
    return {**manifest, **{key: os.path.join(root, key) for key in WORLD_FOLDERS}}


def build_world(root: str, spec: WorldSpec, log=print, workers: int = 1) -> dict:
    """Write base model, image encoder, photos and teachers under `root`; returns the world's manifest.
    `workers` processes sample the photos and the gallery (the world does not depend on their number)."""
    from hdb_core.lidb.file import save_lidb

    manifest_path = os.path.join(root, "world.json")
    if os.path.exists(manifest_path):
        manifest = read_manifest(root)
        saved = {**asdict(WorldSpec()), **manifest["spec"]}     # worlds from before a field existed: its default
        if saved == asdict(spec):
            return manifest
        if {**saved, "extra_train": spec.extra_train} == asdict(spec) and saved["extra_train"] < spec.extra_train:
            return _add_extra_identities(manifest, spec, manifest_path)
        raise SystemExit(f"{root} holds a world built with other settings; use a new --out folder.")
    os.makedirs(root, exist_ok=True)
    base_dir, enc_dir = os.path.join(root, "base"), os.path.join(root, "image_encoder")
    _save_base(base_dir, spec, log)
    save_image_encoder(enc_dir, spec.seed)
    base = load_base_model(base_dir)
    layers = base.layers(True)
    config = LiDBConfig()
    train_ids, held_ids = spec.ids()
    names = train_ids + held_ids
    teach = teachers(layers, config, spec, names)
    injector = base.injector(layers)

    def sample_all(tag: str, per_id: int, workers: int = workers) -> torch.Tensor:
        jobs = [(teach[i], f"{name}/{tag}{k}") for i, name in enumerate(names) for k in range(per_id)]

        def sample_chunk(start: int) -> torch.Tensor:
            chunk = jobs[start:start + 64]
            with injector:
                return sample(base, injector, [c[0] for c in chunk], [c[1] for c in chunk], spec)

        return torch.cat(in_workers(sample_chunk, list(range(0, len(jobs), 64)), workers))

    latents = sample_all("photo", spec.photos)
    # the VAE encoder trains on the photos only, on one core: the gallery is sampled meanwhile on the other
    sampled_gallery = in_background(partial(sample_all, "gallery", spec.gallery, 1), fork=workers > 1)
    scale = 1.0
    err = _train_encoder(base, latents, spec.vae_steps, spec.seed)
    gallery = sampled_gallery()
    base.vae.save_pretrained(os.path.join(base_dir, "vae"), safe_serialization=True)
    photos_dir, teach_dir = os.path.join(root, "photos"), os.path.join(root, "teachers")
    held_dir = os.path.join(root, "held_out_photos")
    os.makedirs(teach_dir, exist_ok=True)
    with torch.no_grad():
        images = base.vae.decode(latents).sample
    for i, name in enumerate(names):
        folder = os.path.join(photos_dir if name in train_ids else held_dir, name)
        os.makedirs(folder, exist_ok=True)
        for k in range(spec.photos):
            _write_png(os.path.join(folder, f"{k}.png"), images[i * spec.photos + k])
        save_lidb(teach[i], os.path.join(teach_dir, f"{name}.safetensors"))
    from safetensors.torch import save_file
    from hdb_core.training.base_model import encode_latents

    with torch.no_grad():
        seen = torch.cat([encode_latents(base, to_png_range(images[i:i + 64]), "cpu")
                          for i in range(0, images.shape[0], 64)])
    save_file({"latents": latents.contiguous(), "gallery": gallery.contiguous(), "encoded": seen.contiguous()},
              os.path.join(root, TEACHER_LATENTS))
    w_raw, b_raw, r_raw = distance_ratio(gallery.reshape(len(names), spec.gallery, -1))
    w_enc, b_enc, r_enc = distance_ratio(seen.reshape(len(names), spec.photos, -1))
    with torch.no_grad(), injector:
        base_s = sample(base, injector, None, [f"base/{k}" for k in range(64)], spec)
    base_spread = float(torch.cdist(base_s.flatten(1), base_s.flatten(1)).pow(2).sum() / (64 * 63))
    log(f"world: VAE round-trip relative error on the photos {err:.4f}; mean squared latent distance: "
        f"two teacher samples of one identity {w_raw:.2f}, of two identities {b_raw:.2f} "
        f"(distance ratio {r_raw:.3f}); encoded photos {w_enc:.2f} vs {b_enc:.2f} (ratio {r_enc:.3f}); "
        f"two base-model samples {base_spread:.2f}")
    # extra identities are added afterwards, and recorded only once their photos are written
    manifest = {"spec": {**asdict(spec), "extra_train": 0}, "latent_scale": scale, "photo_distance_within": w_raw,
                "identity_distance_between": b_raw, "distance_ratio": r_raw, "encoded_distance_within": w_enc,
                "encoded_distance_between": b_enc, "encoded_distance_ratio": r_enc, "base_spread": base_spread,
                "train": train_ids, "held_out": held_ids, "vae_error": err,
                "base": base_dir, "image_encoder": enc_dir, "photos": photos_dir, "held_out_photos": held_dir,
                "teachers": teach_dir}
    manifest["extra_train"] = []
    with open(manifest_path, "w") as f:
        json.dump(manifest, f, indent=1)
    return _add_extra_identities(manifest, spec, manifest_path) if spec.extra_train else manifest


def _add_extra_identities(manifest: dict, spec: WorldSpec, manifest_path: str) -> dict:
    """Photos of the training-only identities `spec.extra_ids()` not yet in the world (same teacher family,
    base model and VAE; the VAE and the world's statistics stay those of the first `spec.identities`)."""
    base = load_base_model(manifest["base"])
    layers = base.layers(True)
    injector = base.injector(layers)
    names = [n for n in spec.extra_ids() if n not in manifest.get("extra_train", [])]
    teach = teachers(layers, LiDBConfig(), spec, names)
    jobs = [(t, name, k) for t, name in zip(teach, names) for k in range(spec.photos)]
    with injector, torch.no_grad():
        for j in range(0, len(jobs), 64):
            chunk = jobs[j:j + 64]
            images = base.vae.decode(sample(base, injector, [c[0] for c in chunk],
                                            [f"{c[1]}/photo{c[2]}" for c in chunk], spec)).sample
            for (_, name, k), image in zip(chunk, images):
                os.makedirs(os.path.join(manifest["photos"], name), exist_ok=True)
                _write_png(os.path.join(manifest["photos"], name, f"{k}.png"), image)
    manifest = {**manifest, "spec": asdict(spec), "extra_train": spec.extra_ids()}
    with open(manifest_path + ".tmp", "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(manifest_path + ".tmp", manifest_path)
    return manifest
