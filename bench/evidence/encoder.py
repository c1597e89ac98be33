"""The evidence world's image encoder, pretrained to tell people apart (or, without labels, to expose
each photo's latent linearly: `pretrain_encoder_on_latents`).

Users feed the hypernetwork a pretrained CLIP-ViT-H, whose features already
separate faces; the world's random encoder does not (another photo of the same
person is the nearest one about half the time, against 0.76 for the latents it
reads). This module gives the world an encoder of the same shape that learnt
identity the way a pretrained one did, from other people: a cosine-softmax
classifier over the *training* identities' photos and their mirrors, applied to
the tokens the hypernetwork reads (the penultimate hidden states, averaged).
Held-out identities are never seen, so how well it separates them is a fair
measure (`identification`).
"""
from __future__ import annotations

import os

import torch

from hdb_core.hypernet.image_encoder import ClipImageEncoder, preprocess, spec_from_hf_config
from hdb_core.training import data
from hdb_core.training.seeding import generator

from .world import IMAGE_SIZE

EMBED_DIM = 64
LOGIT_SCALE = 16.0


def load_photos(folder: str, names: list[str], per_identity: int) -> torch.Tensor:
    """[len(names) * per_identity, H, W, 3] photos in 0..1, identity-major."""
    return torch.stack([data.prepare_image(os.path.join(folder, n, f"{k}.png"), IMAGE_SIZE, "none")
                        for n in names for k in range(per_identity)])


def pooled(model, pixels: torch.Tensor) -> torch.Tensor:
    """The mean of the tokens the hypernetwork reads (penultimate hidden states)."""
    return model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2].mean(1)


def save_encoder(model, out: str) -> None:
    """Write the CLIP vision folder next to `out`, then move it into place (never half-written)."""
    import shutil

    tmp = out + ".tmp"
    model.save_pretrained(tmp, safe_serialization=True)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(tmp, out)


def pretrain_encoder(random_folder: str, out: str, photos: torch.Tensor, per_identity: int, seed: int,
                     steps: int = 1500, batch: int = 256, lr: float = 1e-3, log=print) -> float:
    """Train the encoder in `random_folder` to classify `photos` (identity-major) by person; save to `out`.

    Returns the final training accuracy. The classifier head is thrown away; the encoder keeps its shape, so
    the hypernetwork's EncoderSpec is unchanged.
    """
    from transformers import CLIPVisionModelWithProjection

    from tqdm import tqdm

    model = CLIPVisionModelWithProjection.from_pretrained(random_folder, local_files_only=True).train()
    pixels = preprocess(photos, spec_from_hf_config(model.config))
    pixels = torch.cat([pixels, pixels.flip(-1)])              # the mirrors: prepared data holds both
    labels = (torch.arange(len(photos)) // per_identity).repeat(2)
    n_ids = int(labels.max()) + 1
    g = generator(seed, "encoder-pretrain")
    width = model.config.hidden_size
    torch.manual_seed(seed)                                     # the head's initial weights: a rerun is identical
    head = torch.nn.Sequential(torch.nn.LayerNorm(width), torch.nn.Linear(width, EMBED_DIM))
    classes = torch.nn.Parameter(torch.randn(n_ids, EMBED_DIM, generator=g))
    params = [*model.parameters(), *head.parameters(), classes]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    correct = total = 0
    for step in tqdm(range(steps), desc="image encoder pretraining", leave=False):
        idx = torch.randint(len(pixels), (batch,), generator=g)
        x = pixels[idx] + 0.05 * torch.randn(pixels[idx].shape, generator=g)   # robustness to small changes
        emb = torch.nn.functional.normalize(head(pooled(model, x)), dim=-1)
        logits = LOGIT_SCALE * emb @ torch.nn.functional.normalize(classes, dim=-1).T
        loss = torch.nn.functional.cross_entropy(logits, labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step >= steps - 50:
            correct += int((logits.argmax(1) == labels[idx]).sum())
            total += batch
    accuracy = correct / total
    save_encoder(model, out)
    log(f"image encoder pretrained on {n_ids} training identities ({len(photos)} photos + mirrors, {steps} steps): "
        f"training accuracy {accuracy:.2f}")
    return accuracy


def pretrain_encoder_on_latents(random_folder: str, out: str, vae, latents: torch.Tensor, seed: int,
                                steps: int = 1500, batch: int = 128, lr: float = 1e-3, log=print) -> float:
    """Train the encoder in `random_folder` to expose a photo's latent linearly in the tokens it gives the
    hypernetwork; no identity labels. Save to `out`; returns the held-back relative error of the readout.

    A stand-in for a pretrained CLIP's generality: photos are decoded once from `latents` plus noise (the
    way the world's VAE encoder learnt to invert its decoder), and a linear readout of every penultimate
    token must give the latent back. The readout is thrown away; the encoder keeps its shape.
    """
    from transformers import CLIPVisionModelWithProjection

    from tqdm import tqdm

    from .world import to_png_range

    model = CLIPVisionModelWithProjection.from_pretrained(random_folder, local_files_only=True).train()
    spec = spec_from_hf_config(model.config)
    g = generator(seed, "encoder-latent-pretrain")
    targets = latents + 0.1 * torch.randn(latents.shape, generator=g)
    with torch.no_grad():
        pixels = torch.cat([preprocess(((to_png_range(vae.decode(z).sample) + 1) / 2).permute(0, 2, 3, 1), spec)
                            for z in tqdm(targets.split(64), desc="decoding", leave=False)])
    order = torch.randperm(len(targets), generator=g)
    held, train = order[:256], order[256:]

    def tokens(x: torch.Tensor) -> torch.Tensor:
        return model(pixel_values=x, output_hidden_states=True).hidden_states[-2].flatten(1)

    torch.manual_seed(seed)
    n_tokens = (model.config.image_size // model.config.patch_size) ** 2 + 1
    readout = torch.nn.Linear(n_tokens * model.config.hidden_size, latents[0].numel())
    params = [*model.parameters(), *readout.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    flat = targets.flatten(1)
    scale = float(flat.pow(2).mean())
    for _ in tqdm(range(steps), desc="image encoder pretraining (latents)", leave=False):
        idx = train[torch.randint(len(train), (batch,), generator=g)]
        loss = (readout(tokens(pixels[idx])) - flat[idx]).pow(2).mean() / scale
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        error = float((readout(tokens(pixels[held])) - flat[held]).pow(2).mean() / flat[held].pow(2).mean())
    save_encoder(model, out)
    log(f"image encoder pretrained to expose {len(train)} latents ({steps} steps): held-back relative "
        f"error of the linear readout {error:.3f}")
    return error


@torch.no_grad()
def features(encoder: ClipImageEncoder, photos: torch.Tensor) -> torch.Tensor:
    """The hypernetwork's input features [N, tokens, hidden] of many photos, 64 at a time."""
    return torch.cat([encoder.encode(photos[j:j + 64]) for j in range(0, len(photos), 64)])


@torch.no_grad()
def identification(folder: str, photos: torch.Tensor, per_identity: int) -> float:
    """Leave-one-out nearest-photo identification on the encoder's features (all tokens), e.g. of held-out people."""
    x = features(ClipImageEncoder.from_pretrained(folder), photos).flatten(1).double()
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    d = torch.cdist(x, x)
    d.fill_diagonal_(float("inf"))
    label = torch.arange(len(x)) // per_identity
    return float((label[d.argmin(1)] == label).float().mean())
