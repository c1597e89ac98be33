"""Diagnostics of the hypernetwork's targets and predictions in the evidence world (docs/evidence.md).

Run after `bench/bench_evidence.py` has built its world (default: the full run's, bench/out/evidence):

    P=".venv/bin/python bench/evidence_probe.py"
    $P stage0 --steps 200 --lr 1e-2 --out /tmp/s0          # stage 0 on the first 20 training identities
    $P score --stage0 /tmp/s0                              # how well those LiDBs identify their people
    $P stage0 --all --steps 200 --lr 1e-2 --out /tmp/s0all # stage 0 on every training identity
    $P stage1 --stage0 /tmp/s0all --out /tmp/h.safetensors --set beta=0.1 --set steps=500
    $P score --stage0 /tmp/s0all --hypernet /tmp/h.safetensors   # its predictions: training vs held-out
    $P predictability --stage0 /tmp/s0all                  # how much of the targets a photo can predict
    $P pca --stage0 /tmp/s0all --hypernet /tmp/h.safetensors     # do the targets' top components keep identity?
    $P score --stage0 /tmp/s0all --hypernet /tmp/h.safetensors --offset-scale 1,1.2,1.4   # is it shrunk?
    $P pretrain-encoder --out /tmp/enc                     # an encoder that learnt the training identities
    $P stage1 --stage0 /tmp/s0all --out /tmp/he.safetensors --encoder /tmp/enc   # (score with --encoder too)
    $P pretrain-encoder --objective latent --out /tmp/enl  # one that exposes the photo's latent (no labels)
    $P amortize --stage0 /tmp/s0all --space core          # a map photo -> subspace coordinates (also: factors)
    $P projection --encoder /tmp/enl                       # how well amortize's PCA+LDA inputs identify alone
    $P draws --runs zero:400:1e-3:1,zero:400:1e-3:4       # finetunes at 1 and 4 draws per step, validation ids

With `--world bench/out/evidence-scaled` (after `bench_evidence.py --scaled`) the same on 1,000
training identities; `--extra-train N` first adds training-only identities to a world.

Identity is the bench's recognizer (PCA + LDA fit on the training identities' gallery):
rank-1 identification among all identities and cosine to the identity's class mean, from 8
samples per LiDB. One torch thread.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def load_world(out: str):
    import torch

    from bench.evidence import world as W
    from bench.evidence.identity import Recognizer

    manifest = W.read_manifest(os.path.join(out, "world"))
    spec = W.WorldSpec(**manifest["spec"])
    names = manifest["train"] + manifest["held_out"]
    n_train = len(manifest["train"])
    gallery = W.load_teacher_latents(os.path.join(out, "world"))["gallery"]
    gallery = gallery.reshape(len(names), spec.gallery, 4, 8, 8)
    labels = torch.arange(n_train).repeat_interleave(spec.gallery)
    rec = Recognizer.fit(gallery[:n_train].reshape(-1, 4, 8, 8), labels, 64, 24 if n_train > 100 else 16)
    rec.enrol(names, gallery)
    return manifest, spec, rec


def subset_folder(manifest: dict, count: int, root: str) -> str:
    """A face folder of the first `count` training identities (links), the layout `hdb` reads."""
    os.makedirs(root, exist_ok=True)
    for ident in manifest["train"][:count]:
        link = os.path.join(root, ident)
        if not os.path.exists(link):
            os.symlink(os.path.join(manifest["photos"], ident), link)
    return root


def per_photo_folder(manifest: dict, photo: int, root: str) -> str:
    """A face folder with one "identity" per training photo number `photo` (links), the paper's protocol of
    one pre-optimised LiDB per image: folder `<id>` for photo 0, `<id>_p<k>` for photo k."""
    os.makedirs(root, exist_ok=True)
    for ident in manifest["train"] + manifest.get("extra_train", []):
        folder = os.path.join(root, ident if photo == 0 else f"{ident}_p{photo}")
        os.makedirs(folder, exist_ok=True)
        link = os.path.join(folder, "0.png")
        if not os.path.exists(link):
            os.symlink(os.path.join(manifest["photos"], ident, f"{photo}.png"), link)
    return root


def cmd_stage0(args, manifest, spec) -> None:
    from bench.evidence import world as W
    from hdb_core.training.stage0 import PreoptimizeSettings, preoptimize

    if args.draw_seed is not None:
        # A diagnostic stage 0 cannot do by itself: seed 0's common start (the one every target shares) with
        # another seed's noise and timestep draws, to see how much of a target the draws decide.
        from hdb_core.training import stage0

        common = stage0.init_chunk
        stage0.init_chunk = lambda ids, layers, config, seed: common(ids, layers, config, 0)
    if args.photo is not None:
        data = per_photo_folder(manifest, args.photo, args.out + ".faces")
    else:
        data = manifest["photos"] if args.all else subset_folder(manifest, args.train_ids, args.out + ".faces")
    preoptimize(data, manifest["base"], args.out, PreoptimizeSettings(
        steps=args.steps, learning_rate=args.lr, rank=args.rank, repeats=args.repeats,
        lr_schedule=args.lr_schedule, decay_to_start=args.decay_to_start, trigger=args.trigger,
        prior_weight=args.prior_weight, class_prompt=W.FACE_PROMPT, batch_size=46, checkpoint_every=10 ** 6,
        resolution=64, face_check="none", min_size=64, flip=False,
        seed=args.seed if args.draw_seed is None else args.draw_seed), progress=True)


def cmd_stage1(args, manifest, spec) -> None:
    from bench.evidence import world as W
    from hdb_core.training.stage1 import HypernetSettings, train_hypernet

    # the prior term off unless set (`--set prior_weight=1`), as when the commands in docs/evidence.md ran
    values = dict(steps=500, batch_size=16, learning_rate=1e-3, width=128, heads=4, iterations=4, ema_decay=0,
                  trigger=W.PROMPT, prior_weight=0.0, seed=0)
    for item in args.set:
        key, value = item.split("=", 1)
        kind = type(getattr(HypernetSettings, key))
        values[key] = (value if kind is str else value.lower() in ("1", "true") if kind is bool
                       else int(float(value)) if kind is int else kind(value))
    values.setdefault("warmup_steps", values["steps"] // 10)
    train_hypernet(args.faces or manifest["photos"], args.stage0, manifest["base"],
                   projection_input(args, manifest, spec) or args.encoder or manifest["image_encoder"], args.out,
                   HypernetSettings(checkpoint_every=10 ** 6, resolution=64, face_check="none", min_size=64,
                                    flip=False, val_identities=0, **values))


def identity_scorer(manifest, spec, rec):
    """score(lidb, ident): the recognizer's verdict on 8 samples of base + lidb (seeds no one trained on);
    `lidb` may also be LoRA factors {layer: (down, up)}."""
    from bench.evidence import world as W
    from hdb_core.training.base_model import load_base_model

    base = load_base_model(manifest["base"])
    injector = base.injector(base.layers(True))

    def score(lidb, ident):
        factors = lidb if isinstance(lidb, dict) else {s.name: lidb.down_up(s.name) for s in lidb.layers}
        with injector:
            x = W.sample(base, injector, factors, [f"{ident}/eval{k}" for k in range(8)], spec)
        return rec.score(x, ident)

    return score


def line(label, rows):
    print(f"{label:<52} rank-1 {statistics.fmean(r['rank1'] for r in rows):.2f}  "
          f"cosine {statistics.fmean(r['cos'] for r in rows):.3f}  "
          f"median rank {statistics.median(r['rank'] for r in rows):.0f}", flush=True)


def cmd_score(args, manifest, spec, rec) -> None:
    import torch

    from bench.evidence.run import Settings
    from hdb_core.hypernet.file import load_hypernet
    from hdb_core.hypernet.image_encoder import ClipImageEncoder
    from hdb_core.lidb.file import load_lidb

    score = identity_scorer(manifest, spec, rec)
    train = [i for i in manifest["train"] if os.path.exists(os.path.join(args.stage0, f"{i}.safetensors"))]
    train = train[: args.train_ids]
    line(f"stage-0 LiDBs ({len(train)} training identities)",
         [score(load_lidb(os.path.join(args.stage0, f"{i}.safetensors")), i) for i in train])
    if args.hypernet:
        net = load_hypernet(args.hypernet)
        encoder = projection_input(args, manifest, spec) or ClipImageEncoder.from_pretrained(
            args.encoder or manifest["image_encoder"])

        with torch.no_grad():
            preds = {i: predicted(net, encoder, manifest["photos"], i) for i in train}
            line("hypernet prediction, training identities", [score(lidb, i) for i, lidb in preds.items()])
            if not hasattr(net, "heads_from"):      # the subspace network starts from its subspace's mean
                start = net.subspace().lidb(net.subspace_mean)
            else:
                start = start_point(net, next(iter(preds.values())))
                ratio, cos = offset_agreement(start, preds, args.stage0)
                print(f"  its dW offset from the start point against the stage-0 LiDB's: length {ratio:.2f} of it, "
                      f"cosine {cos:.2f}", flush=True)
            validation = Settings().validation       # the bench's validation identities: the first held-out ones
            held = {i: predicted(net, encoder, manifest["held_out_photos"], i, args.photos)
                    for i in manifest["held_out"]}
            for c in args.offset_scale:
                rows = [score(scaled_offset(start, lidb, c) if c != 1 else lidb, i) for i, lidb in held.items()]
                tag = "" if c == 1 else f" x{c:g}"
                line(f"hypernet prediction{tag}, {len(rows)} held-out identities, {args.photos} photo(s)", rows)
                line(f"  of which the bench's {validation} validation identities", rows[:validation])


def stage0_identities(manifest: dict, stage0: str) -> list[str]:
    """The world's training identities (extra ones included) that have a LiDB in the stage-0 folder."""
    return [i for i in manifest["train"] + manifest.get("extra_train", [])
            if os.path.exists(os.path.join(stage0, f"{i}.safetensors"))]


def predicted(net, encoder, folder: str, ident: str, count: int = 1):
    """The network's LiDB for `ident` from its photos 0..count-1 in `folder` (call under no_grad)."""
    import torch

    from bench.evidence import world as W
    from hdb_core.training import data

    photos = torch.stack([data.prepare_image(os.path.join(folder, ident, f"{k}.png"), W.IMAGE_SIZE, "none")
                          for k in range(count)])
    return net.predict_lidb(encoder.encode(photos))


def start_point(net, like):
    """The LiDB the network predicts from zero weight features (the mean stage-0 LiDB), laid out as `like`."""
    import torch

    from hdb_core.lidb.weights import LiDB

    a, b = net.ungroup(net.heads_from(torch.zeros(1, len(net.layers), net.config.width)))
    return LiDB(like.layers, like.config, {k: v[0] for k, v in a.items()}, {k: v[0] for k, v in b.items()}, {})


def scaled_offset(start, lidb, scale: float):
    """`lidb` with its offset from `start` (the network's start point) multiplied by `scale`."""
    from hdb_core.lidb.weights import LiDB

    a = {k: start.a_train[k] + scale * (v - start.a_train[k]) for k, v in lidb.a_train.items()}
    b = {k: start.b_train[k] + scale * (v - start.b_train[k]) for k, v in lidb.b_train.items()}
    return LiDB(lidb.layers, lidb.config, a, b, dict(lidb.info))


def flat_dw(lidb):
    """All layers' dW of a LiDB as one vector (no factor gauge)."""
    import torch

    return torch.cat([(u @ d).flatten() for d, u in (lidb.down_up(s.name) for s in lidb.layers)])


def offset_agreement(start, predictions: dict, stage0: str) -> tuple[float, float]:
    """Mean (|o| / |o_t|, cos(o, o_t)) of the predicted and stage-0 LiDBs' dW offsets from `start`, all
    layers' dW in one vector (dW: no factor gauge)."""
    import torch

    from hdb_core.lidb.file import load_lidb

    origin = flat_dw(start)
    ratios, cosines = [], []
    for ident, lidb in predictions.items():
        o = flat_dw(lidb) - origin
        o_t = flat_dw(load_lidb(os.path.join(stage0, f"{ident}.safetensors"))) - origin
        ratios.append(float(o.norm() / o_t.norm()))
        cosines.append(float(torch.nn.functional.cosine_similarity(o, o_t, dim=0)))
    return statistics.fmean(ratios), statistics.fmean(cosines)


class FactorRows:
    """LiDBs of one layout as rows of one matrix (`subspace.rows_of`: every layer's A_train and B_train,
    flattened), and back."""

    def __init__(self, lidbs):
        from hdb_core.lidb.subspace import rows_of

        self.like = lidbs[0]
        self.rows = rows_of(lidbs).double()

    def weights(self, rows) -> list:
        """One LiDB per row."""
        from hdb_core.lidb.batch import unstack_train
        from hdb_core.lidb.subspace import split_rows

        a, b = split_rows(rows.float(), self.like.layers, self.like.config)
        return unstack_train(a, b, self.like.layers, self.like.config)


class DeltaRows:
    """LiDBs as rows of every layer's dW (no factor gauge), and rows back as full-rank LoRA factors."""

    def __init__(self, lidbs):
        import torch

        self.names = [s.name for s in lidbs[0].layers]
        deltas = [[lidb.delta(n) for n in self.names] for lidb in lidbs]
        self.shapes = [d.shape for d in deltas[0]]
        self.rows = torch.stack([torch.cat([d.flatten() for d in row]) for row in deltas]).double()

    def weights(self, rows) -> list:
        """One {layer: (down, up)} per row: down the layer's dW, up the identity."""
        import torch

        out = []
        for row in rows:
            parts = row.float().split([s.numel() for s in self.shapes])
            out.append({n: (p.reshape(s), torch.eye(s[0])) for n, p, s in zip(self.names, parts, self.shapes)})
        return out


def cmd_code_ceiling(args, manifest, spec, rec) -> None:
    """What a hypernetwork trained on these targets could reach if it knew each person's hidden code exactly.

    Ridge regression from the world's hidden identity code (u, v) to the stage-0 LiDB, fit on the
    training identities but the first `--train-ids`; those are the R^2 and score of identities the fit
    never saw, the held-out ones the score of their code's LiDB. Near zero means the targets are not a
    (bi)linear function of who the person is: most of a target is something else.
    """
    import torch

    from hdb_core.lidb.file import load_lidb

    train = stage0_identities(manifest, args.stage0)
    lidbs = [load_lidb(os.path.join(args.stage0, f"{i}.safetensors")) for i in train]
    table = FactorRows(lidbs)
    y = table.rows

    def codes(names):
        return torch.stack([torch.cat([hidden_code_features(spec, name, args.bilinear), torch.ones(1)])
                            for name in names]).double()

    x = codes(train)
    fit, unseen = slice(args.train_ids, None), slice(0, args.train_ids)
    w = torch.linalg.solve(x[fit].T @ x[fit] + args.ridge * torch.eye(x.shape[1], dtype=x.dtype), x[fit].T @ y[fit])
    mean = y[fit].mean(0)
    r2 = 1 - float((x[unseen] @ w - y[unseen]).pow(2).sum() / (y[unseen] - mean).pow(2).sum())
    print(f"hidden code -> stage-0 LiDB ({len(train) - args.train_ids} identities fit): R^2 {r2:.2f} on "
          f"{args.train_ids} identities it never saw", flush=True)

    score = identity_scorer(manifest, spec, rec)
    with torch.no_grad():
        line(f"stage-0 LiDBs, those {args.train_ids} identities",
             [score(lidb, i) for lidb, i in zip(lidbs[unseen], train[unseen])])
        line("  their hidden code's LiDB (the fit)",
             [score(lidb, i) for lidb, i in zip(table.weights(x[unseen] @ w), train[unseen])])
        held = manifest["held_out"]
        line(f"the hidden code's LiDB, {len(held)} held-out identities",
             [score(lidb, i) for lidb, i in zip(table.weights(codes(held) @ w), held)])


def cmd_pca(args, manifest, spec, rec) -> None:
    """Does the span of the training targets' top principal components keep the identity and drop the draws?

    Principal components of the stage-0 LiDBs' factors (rows of `FactorRows`; `--space dw`: of their dW,
    `DeltaRows`), less their mean, fit on the training identities but the first `--train-ids`. Those
    identities' own targets, and with `--hypernet` the held-out predictions, are scored projected onto the
    mean plus the top k components: as projected, and with the projected offset lengthened back to the
    unprojected one's length (as `average` does).
    """
    import torch

    from hdb_core.hypernet.file import load_hypernet
    from hdb_core.hypernet.image_encoder import ClipImageEncoder
    from hdb_core.lidb.file import load_lidb

    train = stage0_identities(manifest, args.stage0)
    rows_of = DeltaRows if args.space == "dw" else FactorRows
    table = rows_of([load_lidb(os.path.join(args.stage0, f"{i}.safetensors")) for i in train])
    unseen = args.train_ids
    fit = table.rows[unseen:]
    mean = fit.mean(0)
    _, singular, basis = torch.linalg.svd(fit - mean, full_matrices=False)
    share = (singular ** 2).cumsum(0) / (singular ** 2).sum()
    print(f"{len(fit)} targets fit; variance share of the top " +
          ", ".join(f"{k}: {float(share[min(k, len(share)) - 1]):.2f}" for k in args.k), flush=True)
    score = identity_scorer(manifest, spec, rec)

    def projected(rows, k, lengthen):
        offset = rows - mean
        kept = offset @ basis[:k].T @ basis[:k]
        if lengthen:
            kept = kept * (offset.norm(dim=1, keepdim=True) / kept.norm(dim=1, keepdim=True))
        return table.weights(mean + kept)

    groups = [(f"stage-0 LiDBs, {unseen} training identities outside the fit", train[:unseen], table.rows[:unseen])]
    if args.hypernet:
        net = load_hypernet(args.hypernet)
        encoder = ClipImageEncoder.from_pretrained(manifest["image_encoder"])
        held = manifest["held_out"]
        with torch.no_grad():
            preds = [predicted(net, encoder, manifest["held_out_photos"], i) for i in held]
        groups.append((f"hypernet predictions, {len(held)} held-out identities", held, rows_of(preds).rows))
    for label, names, rows in groups:
        line(label, [score(lidb, i) for lidb, i in zip(table.weights(rows), names)])
        for k in args.k:
            for lengthen in (False, True):
                tag = f"  top {k} components" + (", lengthened" if lengthen else "")
                line(tag, [score(lidb, i) for lidb, i in zip(projected(rows, k, lengthen), names)])


def photo_stack(base, folder: str, names: list[str], photos: int) -> list:
    """Per identity: latents [photos, 4, 8, 8] of its photos 0..photos-1 in `folder`."""
    import torch

    from bench.evidence import world as W
    from hdb_core.training import data
    from hdb_core.training.base_model import photo_latents

    return [photo_latents(base, torch.stack([data.prepare_image(os.path.join(folder, n, f"{j}.png"), W.IMAGE_SIZE,
                                                                "none") for j in range(photos)]), "cpu", False)
            for n in names]


class IdentityProjectionEncoder:
    """A stand-in image encoder for the transformer: one token, a PCA+LDA identity projection fit on the
    training identities' photos (what `amortize --input photo-lda` / `feature-lda` reads), of the photo's VAE
    latent or of the world's image features, so that the pipeline's own stage 1 and prediction can be asked
    what they do with an input in which identity is linear."""

    def __init__(self, manifest: dict, spec, source: str, pca_dims: int = 64):
        import torch

        from bench.evidence import encoder as E
        from bench.evidence import world as W
        from bench.evidence.identity import Recognizer
        from hdb_core.hypernet.image_encoder import ClipImageEncoder, EncoderSpec
        from hdb_core.training.base_model import load_base_model

        self.base = load_base_model(manifest["base"])
        self.image_encoder = ClipImageEncoder.from_pretrained(manifest["image_encoder"]) \
            if source == "features" else None
        train = manifest["train"] + manifest.get("extra_train", [])
        x = self.inputs(E.load_photos(manifest["photos"], train, spec.photos))
        self.projection = Recognizer.fit(x, torch.arange(len(train)).repeat_interleave(spec.photos), pca_dims, 24)
        self.spec = EncoderSpec(hidden_size=24, num_tokens=1, image_size=W.IMAGE_SIZE,
                                name=f"{source} PCA+LDA (evidence_probe.py)")
        self.model = torch.nn.Identity()      # what `hdb prepare` moves to its device

    def inputs(self, images):
        """What the projection reads: the photos' latents, or every token of their image features."""
        from bench.evidence import encoder as E
        from hdb_core.training.base_model import photo_latents

        if self.image_encoder is None:
            return photo_latents(self.base, images, "cpu", False)
        return E.features(self.image_encoder, images).flatten(1)

    def encode(self, images):
        """[N, H, W, 3] images in 0..1 -> [N, 1, 24]."""
        return self.projection.project(self.inputs(images))[:, None]


def projection_input(args, manifest: dict, spec):
    """With `--input photo-lda` or `feature-lda` the stand-in encoder the network reads; None when it reads
    the image encoder's features."""
    if args.input == "features":
        return None
    if args.encoder:
        raise SystemExit(f"--input {args.input} reads the world's own photos and encoder: leave --encoder out.")
    return IdentityProjectionEncoder(manifest, spec, "latent" if args.input == "photo-lda" else "features")


def coefficient_fit(base, injector, build, subspace, directions, latents, names, first, steps, lr) -> dict:
    """{steps: rows [N, D]} of subspace coefficients (from `first` [N, k]) trained with Adam on stage 0's loss
    of each identity's latents, after each of `steps`."""
    import torch

    from bench.evidence import world as W
    from hdb_core.training.base_model import tokenize
    from hdb_core.training.stage0 import diffusion_loss, draw_batch

    input_ids = tokenize(base, [W.PROMPT] * len(names), "cpu")      # the prompt the judge samples with
    coefficients = first.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([coefficients], lr=lr)
    out = {}
    with injector:
        for step in range(max(steps) + 1):
            rows = subspace.mean + coefficients @ directions
            if step in steps:
                out[step] = rows.detach()
            if step == max(steps):
                break
            lat, noise, ts = draw_batch(names, latents, base.num_timesteps, 0, step, False)
            loss = diffusion_loss(base, injector, subspace_factors(subspace, build, rows), input_ids,
                                  lat, noise, ts, torch.float32, True)
            optimizer.zero_grad()
            loss.sum().backward()
            optimizer.step()
        injector.clear()
    return out


def cmd_subspace(args, manifest, spec, rec) -> None:
    """Stage 0 and finetuning restricted to an identity subspace of the other targets (`IdentitySubspace`).

    `pca` projects finished targets and loses their identity; here the photos choose the coefficients, so
    the question is whether the span holds *some* LiDB that identifies a person it never saw (as real
    identity LoRAs do, weights2weights). Fit on the training identities but the first `--train-ids` (all
    of them with `--out`); the coefficients (in units of each direction's spread) are trained on stage 0's
    diffusion loss, for many identities at once, from zero (the mean target) or, with `--hypernet`, from
    the held-out prediction's projection. Scored after each of `--steps`: those first identities from
    their 4 photos, and the held-out ones from photo 0 alone. With `--out`, every training identity's
    LiDB in the span is written there instead (targets for `stage1`).
    """
    import torch

    from hdb_core.hypernet.file import load_hypernet
    from hdb_core.hypernet.image_encoder import ClipImageEncoder
    from hdb_core.lidb.file import load_lidb, save_lidb
    from hdb_core.lidb.subspace import IdentitySubspace, rows_of
    from hdb_core.lidb.batch import LayerFactors
    from hdb_core.training.base_model import load_base_model
    from hdb_core.training.stage0 import lidb_path

    train = stage0_identities(manifest, args.stage0)
    lidbs = [load_lidb(os.path.join(args.stage0, f"{i}.safetensors")) for i in train]
    unseen = 0 if args.out else args.train_ids
    subspace = IdentitySubspace.fit(lidbs[unseen:], max(args.k))
    total = float((rows_of(lidbs[unseen:]) - subspace.mean).pow(2).sum()) / (len(lidbs) - unseen - 1)
    base = load_base_model(manifest["base"])
    build = LayerFactors(subspace.config, subspace.layers, "cpu")
    injector = base.injector(subspace.layers)

    def fitted(folder, names, photos, k, start=None) -> dict:
        """{steps: LiDBs} after each of `args.steps`, coefficients from `start`'s projection (default: 0)."""
        directions = subspace.directions[:k]
        first = torch.zeros(len(names), k) if start is None else (
            (start - subspace.mean) @ directions.T / directions.pow(2).sum(1))
        rows = coefficient_fit(base, injector, build, subspace, directions, photo_stack(base, folder, names, photos),
                               names, first, args.steps, args.lr)
        return {steps: [subspace.lidb(row) for row in r] for steps, r in rows.items()}

    if args.out:
        os.makedirs(args.out, exist_ok=True)
        k, steps = args.k[0], max(args.steps)
        for j in range(0, len(train), 46):
            names = train[j:j + 46]
            for ident, lidb in zip(names, fitted(manifest["photos"], names, spec.photos, k)[steps]):
                save_lidb(lidb, lidb_path(args.out, ident))
        print(f"{len(train)} training identities: LiDBs in the top {k} components written to {args.out}", flush=True)
        return
    score = identity_scorer(manifest, spec, rec)
    held = manifest["held_out"]
    start = None
    if args.hypernet:
        net = load_hypernet(args.hypernet)
        encoder = ClipImageEncoder.from_pretrained(manifest["image_encoder"])
        with torch.no_grad():
            start = rows_of([predicted(net, encoder, manifest["held_out_photos"], i) for i in held])
    with torch.no_grad():
        line(f"stage-0 LiDBs, {unseen} training identities outside the fit",
             [score(lidb, i) for lidb, i in zip(lidbs[:unseen], train)])
    for k in args.k:
        share = float(subspace.directions[:k].pow(2).sum()) / total
        print(f"top {k} components ({share:.2f} of the variance), Adam at {args.lr:g}", flush=True)
        groups = [("1 photo, from the hypernet's prediction" if start is not None else "1 photo, from the mean",
                   fitted(manifest["held_out_photos"], held, 1, k, start), held)]
        if not args.held_out_only:
            groups.insert(0, (f"4 photos, {unseen} training identities", fitted(manifest["photos"], train[:unseen],
                                                                                   spec.photos, k), train))
        with torch.no_grad():
            for label, runs, names in groups:
                for steps, lidbs_k in runs.items():
                    line(f"  {label}, {steps} steps", [score(x, i) for x, i in zip(lidbs_k, names)])


def cmd_agreement(args, manifest, spec) -> None:
    """How reproducible stage 0 is: cosine of two runs' dW (all layers, one vector) for the same identity,
    against that of two different identities in one run."""
    import torch

    from hdb_core.lidb.file import load_lidb

    def dw(folder, ident):
        return flat_dw(load_lidb(os.path.join(folder, f"{ident}.safetensors")))

    ids = [i for i in manifest["train"] if all(os.path.exists(os.path.join(f, f"{i}.safetensors"))
                                                for f in (args.stage0, args.other))][: args.train_ids]
    cos = torch.nn.functional.cosine_similarity
    first = torch.stack([dw(args.stage0, i) for i in ids])
    second = torch.stack([dw(args.other, i) for i in ids])
    for label, x, y in (("dW", first, second),
                        ("dW offset from the identities' mean", first - first.mean(0), second - second.mean(0))):
        same = float(cos(x, y, dim=1).mean())
        other = float(cos(x, x.roll(1, 0), dim=1).mean())
        print(f"{label} cosine over {len(ids)} identities: one identity, two runs {same:.2f}; "
              f"two identities, one run {other:.2f}", flush=True)


def cmd_average(args, manifest, spec) -> None:
    """Stage-0 runs of the same identities (same common start) combined as `hdb preoptimize --repeats` does:
    the start plus the runs' mean offset at their mean length. A per-photo folder's `<id>_p<k>` counts as `<id>`."""
    from hdb_core.lidb.batch import stack_train, unstack_train
    from hdb_core.lidb.file import load_lidb, save_lidb
    from hdb_core.training.stage0 import combine_repeats, common_start, lidb_path

    def path(folder, ident):
        found = [p for p in (lidb_path(folder, ident), *(lidb_path(folder, f"{ident}_p{k}") for k in range(1, 9)))
                 if os.path.exists(p)]
        return found[0] if found else None

    ids = [i for i in manifest["train"] + manifest.get("extra_train", []) if all(path(f, i) for f in args.runs)]
    os.makedirs(args.out, exist_ok=True)
    for ident in ids:
        runs = [load_lidb(path(f, ident)) for f in args.runs]
        start = common_start(runs[0].layers, runs[0].config, 0)
        (a, b), (a0, b0) = stack_train(runs), stack_train([start] * len(runs))
        if args.plain:     # the mean alone, as short as the runs' draws leave it
            a, b = ({n: v.mean(0, keepdim=True) for n, v in t.items()} for t in (a, b))
        else:
            a, b = combine_repeats(a, b, a0, b0, len(runs))
        save_lidb(unstack_train(a, b, runs[0].layers, runs[0].config, **runs[0].info)[0], lidb_path(args.out, ident))
    print(f"{len(ids)} identities: {len(args.runs)} runs each combined into {args.out}", flush=True)


def cmd_predictability(args, manifest, spec) -> None:
    """Ridge regression from one photo to its identity's stage-0 LiDB, fit on photos 0-2, tested on photo 3."""
    import torch

    from bench.evidence import encoder as E
    from hdb_core.hypernet.image_encoder import ClipImageEncoder
    from hdb_core.lidb.batch import stack_train
    from hdb_core.lidb.file import load_lidb
    from hdb_core.training import data
    from hdb_core.training.base_model import encode_latents, load_base_model

    ids = manifest["train"]
    images = E.load_photos(manifest["photos"], ids, spec.photos)
    features = E.features(ClipImageEncoder.from_pretrained(args.encoder or manifest["image_encoder"]), images)
    base = load_base_model(manifest["base"])
    with torch.no_grad():
        latents = torch.cat([encode_latents(base, data.to_model_range(images[j:j + 64]), "cpu")
                             for j in range(0, len(images), 64)])
    a, b = stack_train([load_lidb(os.path.join(args.stage0, f"{i}.safetensors")) for i in ids])
    y = torch.cat([v.flatten(1) for v in [*a.values(), *b.values()]], 1).double()
    y = (y - y.mean(0)).repeat_interleave(spec.photos, 0)
    test = torch.arange(len(y)) % spec.photos == spec.photos - 1
    label = torch.arange(len(y)) // spec.photos
    for name, x in (("image features (all tokens)", features.flatten(1)), ("VAE latents", latents.flatten(1))):
        x = x.double()
        x = (x - x.mean(0)) / (x.std(0) + 1e-6)
        x1 = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
        nearest = label[~test][torch.cdist(x[test], x[~test]).argmin(1)]
        for lam in (100.0, 1000.0):
            w = torch.linalg.solve(x1[~test].T @ x1[~test] + lam * torch.eye(x1.shape[1], dtype=x.dtype),
                                   x1[~test].T @ y[~test])
            r2 = 1 - float((x1[test] @ w - y[test]).pow(2).sum() / y[test].pow(2).sum())
            print(f"{name:<30} ridge {lam:>6g}: held-out-photo R^2 {r2:.2f}; nearest-photo identification "
                  f"{float((nearest == label[test]).float().mean()):.2f}", flush=True)


def cmd_pretrain_encoder(args, manifest, spec) -> None:
    """Pretrain on every training identity's photos; held-out nearest-photo identification before and after."""
    from bench.evidence import encoder as E

    train = E.load_photos(manifest["photos"], manifest["train"] + manifest.get("extra_train", []), spec.photos)
    held = E.load_photos(manifest["held_out_photos"], manifest["held_out"], spec.photos)
    if args.objective == "identity":
        E.pretrain_encoder(manifest["image_encoder"], args.out, train, spec.photos, spec.seed, args.steps, lr=args.lr)
    else:
        import torch

        from bench.evidence import world as W
        from hdb_core.training.base_model import load_base_model

        saved = W.load_teacher_latents(os.path.join(args.world, "world"))
        n = len(manifest["train"])                     # rows are training identities first, then held-out ones
        latents = torch.cat([saved["latents"][:n * spec.photos], saved["gallery"][:n * spec.gallery]])
        vae = load_base_model(manifest["base"]).vae
        E.pretrain_encoder_on_latents(manifest["image_encoder"], args.out, vae, latents, spec.seed, args.steps,
                                      lr=args.lr)
    for name, folder in (("random (the world's)", manifest["image_encoder"]), ("pretrained", args.out)):
        print(f"{name} encoder: held-out nearest-photo identification "
              f"{E.identification(folder, held, spec.photos):.2f}", flush=True)


def cmd_projection(args, manifest, spec) -> None:
    """How well the PCA+LDA projections `amortize --input *-lda` reads identify the held-out people by
    themselves: fit on the training identities' photos, each held-out identity enrolled by its photos 1..3
    and queried with photo 0 (the input photo), nearest enrolment by cosine among all held-out ones."""
    import torch

    from bench.evidence import encoder as E
    from bench.evidence.identity import Recognizer
    from hdb_core.hypernet.image_encoder import ClipImageEncoder
    from hdb_core.training.base_model import load_base_model, photo_latents

    train, held, count = manifest["train"], manifest["held_out"], spec.photos
    labels = torch.arange(len(train)).repeat_interleave(count)

    def identified(x, hx, pca_dims):
        z = Recognizer.fit(x, labels, pca_dims, 24).project(hx).reshape(len(held), count, -1)
        cos = torch.nn.functional.cosine_similarity(z[:, 0, None], z[:, 1:].mean(1)[None], dim=-1)
        return float((cos.argmax(1) == torch.arange(len(held))).float().mean())

    base = load_base_model(manifest["base"])
    photos = [E.load_photos(manifest["photos"], train, count), E.load_photos(manifest["held_out_photos"], held, count)]
    inputs = {"photo latent": [photo_latents(base, p, "cpu", False)[:, 0] for p in photos]}
    for folder in [manifest["image_encoder"], *args.encoder]:
        encoder = ClipImageEncoder.from_pretrained(folder)
        x, hx = (E.features(encoder, p).flatten(1) for p in photos)
        centre, spread = x.mean(0), x.std(0) + 1e-6       # standardised, as amortize reads them
        inputs[f"image features of {folder}"] = [(x - centre) / spread, (hx - centre) / spread]
    print(f"held-out identification of photo 0 by the projection alone ({len(held)} identities, chance "
          f"{1 / len(held):.2f}):", flush=True)
    for name, (x, hx) in inputs.items():
        print(f"  {name}: " + ", ".join(f"PCA {d}: {identified(x, hx, d):.2f}" for d in args.pca_dims), flush=True)


class CoreSubspace:
    """An identity subspace linear in dW: the mean and top principal directions of the stage-0 LiDBs'
    per-layer cores M = A_train B_train (dW = B_aux^T M^T A_aux^T), not of their factors.

    The world's photos move with a teacher's dW about linearly, and its factors multiply, so coordinates
    of dW may be what a linear map from a photo can predict. A row is every layer's core, flattened; a
    row's residual has rank b_l (the injector takes it as factors), `truncated` keeps rank r as a LiDB.
    Directions are stored times their spread, as `IdentitySubspace` does.
    """

    def __init__(self, lidbs, components: int):
        import torch

        from hdb_core.lidb.batch import stack_train
        from hdb_core.lidb.subspace import IdentitySubspace
        from hdb_core.lidb.weights import aux_for_layers

        self.layers, self.config = lidbs[0].layers, lidbs[0].config
        self.aux = aux_for_layers(self.config, self.layers)
        a, b = stack_train(list(lidbs))
        rows = torch.cat([(a[s.name] @ b[s.name]).flatten(1) for s in self.layers], 1)
        fit = IdentitySubspace.fit_rows(rows, self.layers, self.config, components)   # the same PCA, other rows
        self.mean, self.directions = fit.mean, fit.directions
        self.shapes = [self.config.layer_dims(s) for s in self.layers]

    @property
    def components(self) -> int:
        return self.directions.shape[0]

    def cores(self, rows):
        """{name: M [N, a_l, b_l]} of rows [N, D]; differentiable."""
        parts = rows.split([a * b for a, b in self.shapes], dim=1)
        return {s.name: part.reshape(-1, a, b) for s, part, (a, b) in zip(self.layers, parts, self.shapes)}

    def factors(self, rows) -> dict:
        """{name: (down [N, b_l, in], up [N, out, b_l])} of rows [N, D]: the residual B_aux^T M^T A_aux^T."""
        out = {}
        for name, m in self.cores(rows).items():
            a_aux, b_aux = self.aux[name]
            out[name] = ((a_aux @ m).transpose(-1, -2), b_aux.T.expand(m.shape[0], *b_aux.T.shape))
        return out

    def lidb(self, row) -> dict:
        """One row's residual as shared factors (what `identity_scorer` takes besides a LiDB)."""
        return {name: (down[0], up[0]) for name, (down, up) in self.factors(row.reshape(1, -1)).items()}

    def truncated(self, row, rank: int):
        """One row as a LiDB of `rank` (each core's top singular components)."""
        import dataclasses

        import torch

        from hdb_core.lidb.weights import LiDB

        a, b = {}, {}
        for name, m in self.cores(row.reshape(1, -1).double()).items():
            u, sv, vh = torch.linalg.svd(m[0], full_matrices=False)
            a[name] = (u[:, :rank] * sv[:rank].sqrt()).float()
            b[name] = (sv[:rank, None].sqrt() * vh[:rank]).float()
        return LiDB(self.layers, dataclasses.replace(self.config, rank=rank), a, b, {})


def subspace_factors(subspace, build, rows) -> dict:
    """The injector's factors of subspace rows, in either kind of subspace (`build`: a `LayerFactors`)."""
    if hasattr(subspace, "factors"):
        return subspace.factors(rows)
    return build.named(*subspace.train_matrices(rows))


class SubspaceSetup:
    """What `amortize` and `distill` share: the subspace of the stage-0 LiDBs (`--k` directions), the base
    model with an injector on its layers, and the image features [N, photos, T*H] of every training photo
    and [H, T*H] of the held-out identities' photo 0."""

    def __init__(self, args, manifest, spec, encoder_folder: str | None = None):
        import torch

        from bench.evidence import encoder as E
        from hdb_core.hypernet.image_encoder import ClipImageEncoder
        from hdb_core.lidb.file import load_lidb
        from hdb_core.lidb.batch import LayerFactors
        from hdb_core.lidb.subspace import IdentitySubspace
        from hdb_core.training.base_model import load_base_model

        self.train = stage0_identities(manifest, args.stage0)
        lidbs = [load_lidb(os.path.join(args.stage0, f"{i}.safetensors")) for i in self.train]
        self.subspace = (CoreSubspace(lidbs, args.k) if getattr(args, "space", "factors") == "core"
                         else IdentitySubspace.fit(lidbs, args.k))
        self.base = load_base_model(manifest["base"])
        self.build = LayerFactors(self.subspace.config, self.subspace.layers, "cpu")
        self.injector = self.base.injector(self.subspace.layers)
        self.held = manifest["held_out"]
        self.encoder = ClipImageEncoder.from_pretrained(encoder_folder or manifest["image_encoder"])
        self.photos = E.load_photos(manifest["photos"], self.train, spec.photos)
        self.held_pixels = E.load_photos(manifest["held_out_photos"], self.held, 1)
        with torch.no_grad():
            self.features = E.features(self.encoder, self.photos).flatten(1).reshape(len(self.train), spec.photos, -1)
            self.held_features = E.features(self.encoder, self.held_pixels).flatten(1)

    def report(self, score, label: str, rows, names: list[str], to_lidb=None) -> None:
        """Score subspace rows of `names` (the held-out identities): the bench's validation ones, then its test ones."""
        from bench.evidence.run import Settings

        validation = Settings().validation
        results = [score((to_lidb or self.subspace.lidb)(row), i) for row, i in zip(rows, names)]
        line(f"{label}, validation", results[:validation])
        line(f"{label}, test ({sum(r['rank1'] for r in results[validation:]):.0f}/{len(names) - validation})",
             results[validation:])


def hidden_code_features(spec, name: str, bilinear: bool = True):
    """The world's hidden identity code (u, v) of `name`, with `bilinear` also its products u x v (the
    teacher's dW is linear in them): what a perfect reader of the photo could know about the person."""
    import torch

    from bench.evidence import world as W

    u, v, _ = W.hidden_code(spec, name)
    return torch.cat([u, v] + ([torch.outer(u, v).flatten()] if bilinear else []))


def cmd_amortize(args, manifest, spec, rec) -> None:
    """A linear map from one photo's image features to identity-subspace coefficients, trained end to end
    through stage 0's diffusion loss on the training identities' photos (no stage-0 targets to regress onto).

    `subspace` finds an identifying LiDB for a new person in the span by 200 optimisation steps; this asks
    whether one map from the photo can find it at once. Features: every token of the world's image
    encoder, standardised with the training photos' mean and spread. Scored after each of `--eval-at`: the
    held-out identities' prediction from photo 0 (the bench's validation and test identities apart), and,
    with `--finetune`, that prediction + k steps in the subspace on photo 0.

    `--input` swaps what the map reads: the photo latent itself; a PCA+LDA identity projection (to 24
    numbers) fit on the training identities' photos, of the image features or of the photo latents; or, as
    diagnostics, the judge's own projection of the photo latent, or the hidden identity code. `--encoder-lr`
    trains the image encoder along with the map (the pipeline keeps it frozen).
    """
    import time

    import torch

    from bench.evidence import world as W
    from hdb_core.hypernet.image_encoder import preprocess
    from hdb_core.training.base_model import tokenize
    from hdb_core.training.stage0 import diffusion_loss

    setup = SubspaceSetup(args, manifest, spec, args.encoder)
    train, subspace, base, build, injector = setup.train, setup.subspace, setup.base, setup.build, setup.injector
    held, features, held_features = setup.held, setup.features, setup.held_features
    latents = torch.stack([x[:, 0] for x in photo_stack(base, manifest["photos"], train, spec.photos)])
    held_photos = photo_stack(base, manifest["held_out_photos"], held, 1)
    if args.input == "code":
        features = torch.stack([hidden_code_features(spec, i) for i in train])[:, None].expand(-1, spec.photos, -1)
        held_features = torch.stack([hidden_code_features(spec, i) for i in held])
    elif args.input == "photo":
        features = latents.flatten(2)
        held_features = torch.cat([x[:, 0] for x in held_photos]).flatten(1)
    elif args.input == "feature-pca":
        flat = features.flatten(0, 1)
        centre, spread = flat.mean(0), flat.std(0) + 1e-6
        axes = torch.linalg.svd((flat - centre) / spread, full_matrices=False)[2][:args.pca_dims].T
        features = ((flat - centre) / spread @ axes).reshape(len(train), spec.photos, -1)
        held_features = (held_features - centre) / spread @ axes
    elif args.input != "features":
        from bench.evidence.identity import Recognizer

        held_latents = torch.cat([x[:, 0] for x in held_photos])
        x, xh = (features, held_features) if args.input == "feature-lda" else (latents, held_latents)
        projection = rec if args.input == "recognizer" else Recognizer.fit(
            x.flatten(0, 1), torch.arange(len(train)).repeat_interleave(spec.photos), args.pca_dims, 24)
        features = projection.project(x.flatten(0, 1)).reshape(len(train), spec.photos, -1)
        held_features = projection.project(xh)
    print(f"input: {args.input}, {features.shape[-1]} numbers per photo", flush=True)
    centre, spread = features.mean((0, 1)), features.std((0, 1)) + 1e-6
    if args.hidden:
        head = torch.nn.Sequential(torch.nn.Linear(features.shape[-1], args.hidden), torch.nn.GELU(),
                                   torch.nn.Linear(args.hidden, subspace.components))
    else:
        head = torch.nn.Sequential(torch.nn.Linear(features.shape[-1], subspace.components))
    torch.nn.init.zeros_(head[-1].weight)
    torch.nn.init.zeros_(head[-1].bias)       # an untrained map predicts the subspace's mean
    groups = [{"params": list(head.parameters()), "lr": args.lr}]
    encoder = setup.encoder.model
    if args.encoder_lr:        # the image encoder learns too, through the same diffusion loss
        if args.input != "features":
            raise SystemExit("--encoder-lr trains the encoder the map reads: use it with --input features.")
        encoder.requires_grad_(True)
        groups.append({"params": list(encoder.parameters()), "lr": args.encoder_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    trained = [p for group in groups for p in group["params"]]

    def encoded(pixels):
        """Every token of the current encoder's features, flat, with gradient when it trains."""
        with torch.set_grad_enabled(bool(args.encoder_lr) and torch.is_grad_enabled()):
            out = encoder(pixel_values=preprocess(pixels, setup.encoder.spec), output_hidden_states=True)
            return out.hidden_states[-2].flatten(1)

    input_ids = tokenize(base, [W.PROMPT] * args.batch, "cpu")      # the prompt the judge samples with
    score = identity_scorer(manifest, spec, rec)
    g = torch.Generator().manual_seed(args.seed)

    def predict(x, noise: float = 0.0):
        x = (x - centre) / spread
        return head(x + noise * torch.randn(x.shape, generator=g) if noise else x)

    started, losses = time.time(), []
    with injector:
        for step in range(1, max(args.eval_at) + 1):
            pick = torch.randperm(len(train), generator=g)[:args.batch]
            seen = torch.randint(spec.photos, (len(pick),), generator=g)
            shown = seen if args.target == "same" else (seen + torch.randint(1, spec.photos, (len(pick),),
                                                                              generator=g)) % spec.photos
            shown_features = (encoded(setup.photos[pick * spec.photos + seen]) if args.encoder_lr
                              else features[pick, seen])
            rows = subspace.mean + predict(shown_features, args.input_noise) @ subspace.directions
            lat = latents[pick, shown]
            noise = torch.randn(lat.shape, generator=g)
            ts = torch.randint(base.num_timesteps, (len(pick),), generator=g)
            loss = diffusion_loss(base, injector, subspace_factors(subspace, build, rows),
                                  input_ids[:len(pick)], lat, noise, ts, torch.float32, True).mean()
            if args.consistency:       # another photo of the same person should give the same coordinates
                other = (seen + torch.randint(1, spec.photos, (len(pick),), generator=g)) % spec.photos
                gap = predict(features[pick, seen]) - predict(features[pick, other])
                loss = loss + args.consistency * gap.pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            optimizer.step()
            losses.append(float(loss.detach()))
            if step in args.eval_at:
                injector.clear()
                print(f"step {step}: mean loss of the last 100 steps {statistics.fmean(losses[-100:]):.4f}, "
                      f"{time.time() - started:.0f} s", flush=True)
                with torch.no_grad():
                    if args.encoder_lr:
                        held_features = encoded(setup.held_pixels)
                        features = encoded(setup.photos).reshape(len(train), spec.photos, -1)
                    rows = subspace.mean + predict(held_features) @ subspace.directions
                    setup.report(score, f"  prediction, step {step}", rows, held)
                    for rank in args.truncate:
                        setup.report(score, f"  prediction, step {step}, kept to rank {rank}", rows, held,
                                     lambda row, rank=rank: subspace.truncated(row, rank))
                    line(f"  prediction, step {step}, {args.train_ids} training identities (photo 0)",
                         [score(subspace.lidb(r), i) for r, i in
                          zip(subspace.mean + predict(features[:args.train_ids, 0]) @ subspace.directions, train)])
        injector.clear()
    if args.finetune:
        with torch.no_grad():
            first = predict(held_features)
        fits = coefficient_fit(base, injector, build, subspace, subspace.directions,
                               held_photos, held, first, args.finetune,
                               args.finetune_lr)
        with torch.no_grad():
            for steps, rows in fits.items():
                setup.report(score, f"  prediction + {steps} steps in the subspace (Adam {args.finetune_lr:g})",
                             rows, held)


def cmd_distill(args, manifest, spec, rec) -> None:
    """Amortize by regression instead: every training photo's own subspace coefficients (`coefficient_fit`
    from the mean, `--fit-steps` on that photo alone, the optimum `amortize` aims at), then ridge regression
    from the photo's standardised image features to them, one `--ridge` strength after another; the
    held-out identities scored from photo 0 as `amortize` does."""
    import torch

    setup = SubspaceSetup(args, manifest, spec)
    subspace = setup.subspace
    photos = [x[j:j + 1] for x in photo_stack(setup.base, manifest["photos"], setup.train, spec.photos)
              for j in range(spec.photos)]
    names = [f"{i}/{j}" for i in setup.train for j in range(spec.photos)]
    fitted = coefficient_fit(setup.base, setup.injector, setup.build, subspace, subspace.directions, photos, names,
                             torch.zeros(len(names), subspace.components), [args.fit_steps],
                             args.fit_lr)[args.fit_steps]
    directions = subspace.directions
    targets = ((fitted - subspace.mean) @ directions.T / directions.pow(2).sum(1)).double()
    print(f"{len(names)} training photos fit in the subspace ({args.fit_steps} steps, Adam {args.fit_lr:g})",
          flush=True)
    features, held_features = setup.features.flatten(0, 1).double(), setup.held_features.double()
    centre, spread = features.mean(0), features.std(0) + 1e-6

    def with_bias(x):
        return torch.cat([(x - centre) / spread, torch.ones(len(x), 1, dtype=torch.float64)], 1)

    x, xh = with_bias(features), with_bias(held_features)
    score = identity_scorer(manifest, spec, rec)
    with torch.no_grad():
        line(f"  the fits themselves, photo 0 of {args.train_ids} training identities",
             [score(subspace.lidb(row), i) for row, i in zip(fitted[::spec.photos][:args.train_ids], setup.train)])
        for lam in args.ridge:
            w = torch.linalg.solve(x.T @ x + lam * torch.eye(x.shape[1], dtype=x.dtype), x.T @ targets)
            setup.report(score, f"  ridge {lam:g}", subspace.mean + (xh @ w).float() @ directions, setup.held)


def cmd_draws(args, manifest, spec, rec) -> None:
    """Finetunes of the bench's validation or test identities (one photo each) at given step counts, rates
    and draws per step, judged as the bench judges an arm: from zero or from `--hypernet`'s prediction, with
    the default relaxation or the one a run names, and with the finetune's prior term for "a face" at a
    given weight (`diffusers_loss_fn`'s; 0: off); each run's mean, then its paired differences from the
    first run (bootstrap 95 %)."""
    from dataclasses import replace

    import torch

    from bench.evidence import world as W
    from bench.evidence.run import Judge, Settings, factors_of
    from hdb_core.defaults import RELAXATION
    from hdb_core.hypernet.file import load_hypernet
    from hdb_core.hypernet.image_encoder import ClipImageEncoder
    from hdb_core.training import data
    from hdb_core.training.base_model import encode_latents, load_base_model, tokenize
    from hdb_core.training.finetune import FinetuneSettings, diffusers_loss_fn, finetune, zero_start

    s = replace(Settings(), world=spec)
    held = manifest["held_out"]
    idents = held[:s.validation] if args.split == "validation" else held[s.validation:]
    base = load_base_model(manifest["base"])
    layers = base.layers(True)
    injector = base.injector(layers)
    net = load_hypernet(args.hypernet) if args.hypernet else None
    encoder = ClipImageEncoder.from_pretrained(manifest["image_encoder"])
    input_ids = tokenize(base, [W.PROMPT], "cpu")
    runs = [(kind, int(steps), float(lr), int(draws), (rest[0] or RELAXATION) if rest else RELAXATION,
             float(rest[1]) if len(rest) > 1 else 0.0)
            for kind, steps, lr, draws, *rest in (r.split(":") for r in args.runs.split(","))]
    face_ids = tokenize(base, [W.FACE_PROMPT], "cpu")
    if any(kind == "net" for kind, *_ in runs) and net is None:
        raise SystemExit("runs from 'net' need --hypernet")
    scores: dict[tuple, list[dict]] = {run: [] for run in runs}
    with injector:
        for ident in idents:
            folder = os.path.join(manifest["held_out_photos"], ident)
            photos = torch.stack([data.prepare_image(os.path.join(folder, p), W.IMAGE_SIZE, "none")
                                  for p in sorted(os.listdir(folder))])
            judge = Judge(base, injector, rec, photos[1:], ident, s)
            latent = encode_latents(base, data.to_model_range(photos[:1]), "cpu")
            for run in runs:
                kind, steps, lr, draws, relaxation, prior = run
                with torch.no_grad():
                    start = (zero_start(layers, s.ft_rank, torch.Generator().manual_seed(s.seed), relaxation)
                             if kind == "zero" else net.predict_lidb(encoder.encode(photos[:1])))
                if steps:
                    loss = diffusers_loss_fn(base, injector, torch.stack([latent, latent], 1), input_ids, False,
                                             draws, prior_ids=face_ids, prior_weight=prior)
                    start = finetune(start, loss, FinetuneSettings(
                        steps=steps, learning_rate=lr, relaxed_rank=s.ft_rank, draws_per_step=1,
                        relaxation=relaxation, seed=s.seed)).lidb
                injector.clear()
                scores[run].append(judge(factors_of(start)))      # 0 steps: the start itself
            print(f"  {ident} done", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({":".join(map(str, run)): rows for run, rows in scores.items()}, f, indent=1)
    print_runs({f"{kind} + {steps} steps, lr {lr:g}, {draws} draws/step, {relaxation}, prior {prior:g}": rows
                for (kind, steps, lr, draws, relaxation, prior), rows in scores.items()}, s)


def print_runs(scores: dict[str, list[dict]], s) -> None:
    """Each run's mean scores, then its paired differences from the first run's (bootstrap 95 %)."""
    from bench.evidence.run import bootstrap_ci

    first = next(iter(scores.values()))
    for n, (label, rows) in enumerate(scores.items()):
        text = (f"{label:<58} rank-1 {sum(r['rank1'] for r in rows):.0f}/{len(rows)}  "
                f"cosine {statistics.fmean(r['cos'] for r in rows):.3f}  "
                f"style {statistics.fmean(r['style'] for r in rows):.3f}  "
                f"drift {statistics.fmean(r['drift'] for r in rows):.1f}")
        if n:
            for key in ("cos", "style", "drift"):
                m, lo, hi = bootstrap_ci([a[key] - b[key] for a, b in zip(rows, first)], s.bootstrap, s.seed)
                text += f"  {key} vs the first {m:+.3f} [{lo:+.3f}, {hi:+.3f}]"
        print(text, flush=True)


def cmd_compare(args) -> None:
    """Runs from several `draws --json` files (FILE or FILE=RUN, RUN as the file names it; the same split),
    the first the reference of the paired differences."""
    from bench.evidence.run import Settings

    scores = {}
    for item in args.runs:
        path, _, wanted = item.partition("=")
        with open(path) as f:
            runs = json.load(f)
        for run, rows in runs.items():
            if not wanted or run == wanted:
                scores[f"{os.path.basename(path)} {run}"] = rows
    if len({len(rows) for rows in scores.values()}) != 1:
        raise SystemExit("the runs compared must come from the same split (the same identities)")
    print_runs(scores, Settings())


def main(argv=None) -> int:
    import torch

    from bench.evidence import world as W
    from hdb_core import defaults

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", default=os.path.join(REPO, "bench", "out", "evidence"),
                   help="a bench_evidence.py output folder (its world/ is used)")
    p.add_argument("--train-ids", type=int, default=20, help="training identities stage0/score look at")
    p.add_argument("--extra-train", type=int, default=None,
                   help="first add training-only identities to the world until it has this many (photos only)")
    sub = p.add_subparsers(dest="cmd", required=True)
    s0 = sub.add_parser("stage0")
    s0.add_argument("--steps", type=int, default=200)
    s0.add_argument("--lr", type=float, default=1e-2)
    s0.add_argument("--all", action="store_true", help="every training identity (stage 1 needs them)")
    s0.add_argument("--lr-schedule", choices=defaults.STAGE0_LR_SCHEDULES, default=defaults.STAGE0_LR_SCHEDULE,
                    help="cosine: decayed to zero over the steps")
    s0.add_argument("--decay-to-start", type=float, default=0.0, help="L2 pull toward the common start")
    s0.add_argument("--seed", type=int, default=0, help="stage 0's draws and common start")
    s0.add_argument("--repeats", type=int, default=1, help="runs per identity, averaged (hdb preoptimize --repeats)")
    s0.add_argument("--rank", type=int, default=1, help="the LiDBs' rank (the hypernetwork predicts the same)")
    s0.add_argument("--draw-seed", type=int, help="another seed's draws from seed 0's common start")
    s0.add_argument("--photo", type=int, help="one LiDB per training photo of this number (every identity)")
    s0.add_argument("--trigger", default=W.PROMPT, help="the training prompt (default: the one the judge samples with)")
    s0.add_argument("--prior-weight", type=float, default=0.0, help="stage 0's prior term for \"a face\"")
    s0.add_argument("--out", required=True)
    s1 = sub.add_parser("stage1")
    s1.add_argument("--stage0", required=True)
    s1.add_argument("--out", required=True)
    s1.add_argument("--set", action="append", default=[], help="a HypernetSettings field, e.g. beta=0.1")
    s1.add_argument("--encoder", help="another CLIP vision folder (see make-encoder)")
    s1.add_argument("--faces", help="the face folder stage 0 read (default: the world's photos)")
    s1.add_argument("--input", choices=("features", "photo-lda", "feature-lda"), default="features",
                    help="what the network reads: the image encoder's features, or (diagnostics) a PCA+LDA "
                         "identity projection of the photo latent or of those features, as `amortize --input`")
    me = sub.add_parser("make-encoder", help="a random CLIP vision folder like the world's, other patch size")
    me.add_argument("--patch-size", type=int, default=8)
    me.add_argument("--width", type=int, default=64)
    me.add_argument("--layers", type=int, default=2)
    me.add_argument("--out", required=True)
    pe = sub.add_parser("pretrain-encoder", help="the world's encoder trained to classify the training identities")
    pe.add_argument("--steps", type=int, default=1500)
    pe.add_argument("--lr", type=float, default=1e-3)
    pe.add_argument("--out", required=True)
    pe.add_argument("--objective", choices=("identity", "latent"), default="identity",
                    help="classify the training identities' photos, or (no labels) expose each photo's latent "
                         "linearly, from the training identities' photos and gallery samples")
    pj = sub.add_parser("projection", help="held-out identification by amortize's PCA+LDA inputs alone")
    pj.add_argument("--encoder", action="append", default=[], help="also this CLIP vision folder's features")
    pj.add_argument("--pca-dims", type=lambda v: [int(x) for x in v.split(",")], default=[64, 256])
    sc = sub.add_parser("score")
    sc.add_argument("--stage0", required=True)
    sc.add_argument("--hypernet")
    sc.add_argument("--encoder", help="the CLIP vision folder the hypernetwork was trained with")
    sc.add_argument("--offset-scale", type=lambda v: [float(x) for x in v.split(",")], default=[1.0],
                    help="comma-separated factors for the prediction's offset from the mean stage-0 LiDB")
    sc.add_argument("--photos", type=int, default=1, help="held-out predictions from photos 0..N-1 at once")
    sc.add_argument("--input", choices=("features", "photo-lda", "feature-lda"), default="features",
                    help="what the network was trained to read (stage1 --input)")
    cc = sub.add_parser("code-ceiling", help="the targets' own limit: stage-0 LiDBs predicted from the hidden code")
    cc.add_argument("--stage0", required=True)
    cc.add_argument("--ridge", type=float, default=1.0)
    cc.add_argument("--bilinear", action="store_true", help="also the code's u x v products as features")
    pc = sub.add_parser("pca", help="targets and predictions kept to the top principal components of the targets")
    pc.add_argument("--stage0", required=True)
    pc.add_argument("--hypernet")
    pc.add_argument("--k", type=lambda v: [int(x) for x in v.split(",")], default=[8, 32, 128],
                    help="comma-separated numbers of components")
    pc.add_argument("--space", choices=("factors", "dw"), default="factors",
                    help="rows of the LiDBs' A_train/B_train factors, or of their dW (no factor gauge)")
    ss = sub.add_parser("subspace", help="stage 0 inside the span of the other targets' top components")
    ss.add_argument("--stage0", required=True)
    ss.add_argument("--k", type=lambda v: [int(x) for x in v.split(",")], default=[32, 128],
                    help="components kept (comma-separated); with --out the first")
    ss.add_argument("--steps", type=lambda v: [int(x) for x in v.split(",")], default=[200],
                    help="scored after these step counts (comma-separated); with --out the last")
    ss.add_argument("--lr", type=float, default=0.1, help="Adam rate of the coefficients (units of spread)")
    ss.add_argument("--hypernet", help="held-out identities start from this network's prediction, projected")
    ss.add_argument("--held-out-only", action="store_true", help="skip the training identities' 4-photo fit")
    ss.add_argument("--out", help="write every training identity's subspace LiDB here (stage-1 targets)")
    am = sub.add_parser("amortize", help="a linear map photo -> subspace coefficients, trained by the diffusion loss")
    am.add_argument("--stage0", required=True)
    am.add_argument("--k", type=int, default=128, help="principal directions of the stage-0 LiDBs")
    am.add_argument("--lr", type=float, default=3e-4, help="AdamW rate of the map (1e-3 diverged)")
    am.add_argument("--batch", type=int, default=46)
    am.add_argument("--target", choices=("same", "other"), default="same",
                    help="the diffusion loss on the photo the map sees, or on another photo of the person")
    am.add_argument("--eval-at", type=lambda v: [int(x) for x in v.split(",")], default=[500, 1000, 2000],
                    help="training steps after which to score (comma-separated); the last ends training")
    am.add_argument("--finetune", type=lambda v: [int(x) for x in v.split(",")], default=[],
                    help="then also the prediction + these step counts in the subspace (comma-separated)")
    am.add_argument("--finetune-lr", type=float, default=0.1)
    am.add_argument("--encoder", help="another CLIP vision folder (see make-encoder, pretrain-encoder)")
    am.add_argument("--input", default="features",
                    choices=("features", "photo", "feature-pca", "code", "recognizer", "photo-lda", "feature-lda"),
                    help="what the map reads: the image features, their top --pca-dims principal components, or "
                         "the photo latent itself; a PCA+LDA fit on the training identities' photos of the "
                         "features (feature-lda) or of the photo latents (photo-lda); as diagnostics the hidden "
                         "identity code, or the judge's own projection of the photo's latent (recognizer)")
    am.add_argument("--consistency", type=float, default=0.0,
                    help="weight of the squared gap between the coordinates two photos of one person give")
    am.add_argument("--seed", type=int, default=0, help="the training draws' seed (batches, noise, timesteps)")
    am.add_argument("--pca-dims", type=int, default=64,
                    help="PCA dimensions of --input feature-pca, and before the LDA of --input *-lda")
    am.add_argument("--input-noise", type=float, default=0.0,
                    help="standard deviation of Gaussian noise added to the standardised input while training "
                         "(a ridge penalty in effect: is the map overfitting its many inputs?)")
    am.add_argument("--encoder-lr", type=float, default=0.0,
                    help="AdamW rate of the image encoder, trained with the map through the diffusion loss "
                         "(0: frozen, as the pipeline keeps it)")
    am.add_argument("--hidden", type=int, default=0, help="a hidden GELU layer of this width (0: the linear map)")
    am.add_argument("--space", choices=("factors", "core"), default="factors",
                    help="principal directions of the LiDBs' factors, or of each layer's core A_train B_train "
                         "(linear in dW; see CoreSubspace)")
    am.add_argument("--truncate", type=lambda v: [int(x) for x in v.split(",")], default=[],
                    help="with --space core: also score the prediction kept to these ranks as LiDBs")
    dr = sub.add_parser("draws", help="finetunes of held-out identities at given draws per step and relaxations")
    dr.add_argument("--split", choices=("validation", "test"), default="validation")
    dr.add_argument("--runs", required=True,
                    help="comma-separated start:steps:lr:draws[:relaxation[:prior]] (0 steps: the start as it is), "
                         "start 'zero' or 'net' "
                         "(--hypernet's prediction), relaxation aux_subspace (default; empty: the default) or "
                         "free_lora, prior the weight of the finetune's prior term for 'a face' (default 0: off)")
    dr.add_argument("--hypernet", help="a hypernetwork file, e.g. bench/out/evidence/subspace-hypernet.safetensors")
    dr.add_argument("--json", help="also write every run's per-identity scores here")
    cp = sub.add_parser("compare", help="runs of several `draws --json` files, paired against the first")
    cp.add_argument("runs", nargs="+",
                    help="FILE (every run in it) or FILE=RUN (start:steps:lr:draws:relaxation:prior)")
    di = sub.add_parser("distill", help="ridge regression photo -> its own subspace coefficients")
    di.add_argument("--stage0", required=True)
    di.add_argument("--k", type=int, default=128, help="principal directions of the stage-0 LiDBs")
    di.add_argument("--fit-steps", type=int, default=100, help="Adam steps of each training photo's own fit")
    di.add_argument("--fit-lr", type=float, default=0.1)
    di.add_argument("--ridge", type=lambda v: [float(x) for x in v.split(",")], default=[10.0, 100.0, 1000.0],
                    help="comma-separated ridge strengths")
    ag = sub.add_parser("agreement", help="stage 0's run-to-run agreement (two folders of the same identities)")
    ag.add_argument("--stage0", required=True)
    ag.add_argument("--other", required=True)
    av = sub.add_parser("average", help="combine stage-0 runs of the same identities as --repeats does")
    av.add_argument("--out", required=True)
    av.add_argument("--plain", action="store_true", help="the runs' mean, not scaled back to a run's length")
    av.add_argument("runs", nargs="+", help="stage-0 folders from the same common start (seed 0)")
    pr = sub.add_parser("predictability")
    pr.add_argument("--stage0", required=True)
    pr.add_argument("--encoder", help="another CLIP vision folder to compare")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    if args.cmd == "compare":        # needs no world
        cmd_compare(args)
        return 0
    if args.extra_train is not None:
        from dataclasses import replace

        with open(os.path.join(args.world, "world", "world.json")) as f:
            saved = W.WorldSpec(**json.load(f)["spec"])
        W.build_world(os.path.join(args.world, "world"), replace(saved, extra_train=args.extra_train))
    manifest, spec, rec = load_world(args.world)
    if args.cmd == "stage0":
        cmd_stage0(args, manifest, spec)
    elif args.cmd == "stage1":
        cmd_stage1(args, manifest, spec)
    elif args.cmd == "make-encoder":
        W.save_image_encoder(args.out, spec.seed, args.patch_size, args.width, args.layers)
    elif args.cmd == "pretrain-encoder":
        cmd_pretrain_encoder(args, manifest, spec)
    elif args.cmd == "projection":
        cmd_projection(args, manifest, spec)
    elif args.cmd == "score":
        cmd_score(args, manifest, spec, rec)
    elif args.cmd == "pca":
        cmd_pca(args, manifest, spec, rec)
    elif args.cmd == "subspace":
        cmd_subspace(args, manifest, spec, rec)
    elif args.cmd == "amortize":
        cmd_amortize(args, manifest, spec, rec)
    elif args.cmd == "distill":
        cmd_distill(args, manifest, spec, rec)
    elif args.cmd == "agreement":
        cmd_agreement(args, manifest, spec)
    elif args.cmd == "average":
        cmd_average(args, manifest, spec)
    elif args.cmd == "code-ceiling":
        cmd_code_ceiling(args, manifest, spec, rec)
    elif args.cmd == "draws":
        cmd_draws(args, manifest, spec, rec)
    else:
        cmd_predictability(args, manifest, spec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
