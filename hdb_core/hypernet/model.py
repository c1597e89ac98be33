"""The HyperNetwork: face features in, a whole rank-r LiDB out (Ruiz et al. 2024, sec. 4.2).

    f        = frozen CLIP vision features of the photo(s)          [B, T, hidden]
    theta_0  = 0                                                     [B, L, width]
    theta_k  = theta_{k-1} + T(f, theta_{k-1}),  k = 1..s            (iterative refinement)
    A_l, B_l = linear heads of layer l applied to theta_s            [a_l, r], [r, b_l]

T is a transformer decoder with one query token per LiDB target layer: the
token is the layer's learned embedding plus its current weight features
theta_{k-1}. Tokens attend to each other (so layers can coordinate) and to the
image tokens (cross-attention). Heads are bias-free linear maps, so zero
passes give exactly A = B = 0, and every pass moves the prediction by a delta.

Efficiency: the decoder runs on all layers at once (tokens are a batch
dimension, never a Python loop over layers), the cross-attention keys/values of
the image are computed once per forward and reused by every pass, and the
per-layer heads are stored stacked per (a_l, b_l) group, so a pass is a few
batched matmuls whatever the number of layers.

Several photos of one person (`predict_lidb` with N images): the image tokens
of all photos are concatenated into one memory that the layer tokens attend
over. Attention is a weighted average over keys, so the prediction does not
depend on the photos' order, N copies of one photo predict exactly what the
single photo predicts, and each layer token can take each detail from the
photo that shows it best. Averaging the predicted LiDBs instead would be
wrong for rank-1 factors (A and B are only defined up to sign and scale, and
the mean of rank-1 products is not rank 1); averaging features would blur the
token grids of differently framed photos.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from hdb_core.errors import HDBError
from hdb_core.hypernet.image_encoder import VIT_H_14, EncoderSpec
from hdb_core.lidb.weights import LiDB, LiDBConfig
from hdb_core.lidb.targets import LayerSpec


@dataclass(frozen=True)
class HyperNetConfig:
    """Decoder size. Defaults: the paper's 2-layer decoder at width 512 with 4 refinement passes.

    22.9M parameters for the SD1.5 target list (91.8 MB file; bench/bench_predict.py); per pass
    the decoder is cheap (176 tokens), so a 24 GB GPU spends its memory on the
    frozen UNet and ViT during training, not on the hypernetwork.
    """

    width: int = 512
    depth: int = 2
    heads: int = 8
    iterations: int = 4
    mlp_ratio: int = 4

    def __post_init__(self):
        for k in ("width", "depth", "heads", "mlp_ratio"):
            if int(getattr(self, k)) < 1:
                raise ValueError(f"HyperNetConfig.{k} must be at least 1")
        if self.iterations < 0:
            raise ValueError("HyperNetConfig.iterations must be 0 or more")
        if self.width % self.heads:
            raise ValueError(f"HyperNetConfig.width {self.width} is not divisible by heads {self.heads}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "HyperNetConfig":
        return cls(**{k: int(d[k]) for k in ("width", "depth", "heads", "iterations", "mlp_ratio")})


def group_key(a_l: int, b_l: int) -> str:
    return f"{a_l}x{b_l}"


def _contiguous(idx: tuple[int, ...]) -> bool:
    return idx[-1] - idx[0] + 1 == len(idx)


class _Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, -1).transpose(1, 2)

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv(x).chunk(2, dim=-1)
        return self._split(k), self._split(v)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        y = F.scaled_dot_product_attention(self._split(self.q(x)), *kv)
        return self.out(y.transpose(1, 2).flatten(2))


class DecoderBlock(nn.Module):
    """Pre-norm transformer decoder block: self-attention over layer tokens, cross-attention to the image, MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm_self = nn.LayerNorm(width)
        self.self_attn = _Attention(width, heads)
        self.norm_cross = nn.LayerNorm(width)
        self.cross_attn = _Attention(width, heads)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, x: torch.Tensor, memory_kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        h = self.norm_self(x)
        x = x + self.self_attn(h, self.self_attn.keys_values(h))
        x = x + self.cross_attn(self.norm_cross(x), memory_kv)
        return x + self.mlp(self.norm_mlp(x))


class LiDBPredictor(nn.Module):
    """What every hypernetwork shares: its LiDB layout, encoder and file info, and `predict_lidb`."""

    def __init__(self, layers: Iterable[LayerSpec], lidb_config: LiDBConfig, encoder: EncoderSpec):
        super().__init__()
        self.lidb_config, self.encoder = lidb_config, encoder
        self.base_model = ""        # free-form hint ("SD1.5"), travels in the file
        self.info: dict[str, str] = {}  # how it was trained, travels in the file
        self.layers = tuple(layers)
        if not self.layers:
            raise ValueError("a HyperNetwork needs at least one target layer")
        names = [s.name for s in self.layers]
        if len(set(names)) != len(names):
            raise ValueError("duplicate layer names in the HyperNetwork's target list")

    def _check_features(self, features: torch.Tensor) -> None:
        if features.dim() != 3 or features.shape[-1] != self.encoder.hidden_size:
            raise HDBError(f"The hypernetwork expects image features [batch, tokens, {self.encoder.hidden_size}] "
                           f"from {self.encoder.name}, but got {tuple(features.shape)}; connect the CLIP vision "
                           f"model it was trained with.")

    def forward(self, features: torch.Tensor, iterations: int | None = None
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(a_train {name: [B, a_l, r]}, b_train {name: [B, r, b_l]}) for a batch of B photos."""
        raise NotImplementedError

    @torch.no_grad()
    def predict_lidb(self, features: torch.Tensor, iterations: int | None = None, **info) -> LiDB:
        """One LiDB from one or several photos of one person (features [N, T, hidden]; see module doc)."""
        self._check_features(features)
        if features.shape[0] == 0:
            raise HDBError("The image batch is empty; connect at least one photo of the face to image.")
        device = next(iter(self.buffers())).device
        memory = features.reshape(1, -1, features.shape[-1]).to(device)
        a_train, b_train = self.forward(memory, iterations)
        a_train = {k: v[0].detach().float().cpu().clone() for k, v in a_train.items()}
        b_train = {k: v[0].detach().float().cpu().clone() for k, v in b_train.items()}
        info = {"source": "predicted", **info}
        return LiDB(self.layers, self.lidb_config, a_train, b_train, info)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class HyperNetwork(LiDBPredictor):
    """Predicts the LiDB train matrices of `layers` from CLIP vision features.

    `forward(features [B, T, hidden], iterations)` returns the A/B dicts
    (differentiable, batched over B); `predict_lidb` one LiDB from one or several
    photos of one person.
    """

    def __init__(self, config: HyperNetConfig, layers: Iterable[LayerSpec], lidb_config: LiDBConfig,
                 encoder: EncoderSpec = VIT_H_14):
        super().__init__(layers, lidb_config, encoder)
        self.config = config
        w = config.width

        self.image_norm = nn.LayerNorm(encoder.hidden_size)
        self.image_proj = nn.Linear(encoder.hidden_size, w)
        self.layer_embed = nn.Parameter(torch.randn(len(self.layers), w) * 0.02)
        self.blocks = nn.ModuleList(DecoderBlock(w, config.heads, config.mlp_ratio) for _ in range(config.depth))
        self.delta_norm = nn.LayerNorm(w)
        self.delta = nn.Linear(w, w)

        # Per-layer linear heads, stacked per (a_l, b_l) group: weight [L_g, width, a_l*r + r*b_l].
        groups: dict[str, list[int]] = {}
        self.group_dims: dict[str, tuple[int, int]] = {}
        for i, spec in enumerate(self.layers):
            a_l, b_l = lidb_config.layer_dims(spec)
            key = group_key(a_l, b_l)
            groups.setdefault(key, []).append(i)
            self.group_dims[key] = (a_l, b_l)
        self.group_layers = {k: tuple(v) for k, v in groups.items()}
        # Near-zero start: the heads predict the offset from a fixed point (`set_offset`, the mean
        # stage-0 LiDB in training), so an untrained network already predicts that mean instead
        # of random weights as large as the targets.
        self.heads = nn.ParameterDict({
            k: nn.Parameter(torch.randn(len(idx), w, self._head_out(k)) * (1e-3 / math.sqrt(w)))
            for k, idx in self.group_layers.items()})
        for k, idx in self.group_layers.items():
            a_l, b_l = self.group_dims[k]
            self.register_buffer(f"offset_a_{k}", torch.zeros(len(idx), a_l, lidb_config.rank))
            self.register_buffer(f"offset_b_{k}", torch.zeros(len(idx), lidb_config.rank, b_l))

    def _head_out(self, key: str) -> int:
        a_l, b_l = self.group_dims[key]
        return (a_l + b_l) * self.lidb_config.rank

    # -- maths --------------------------------------------------------------------------------
    def weight_features(self, features: torch.Tensor, iterations: int | None = None) -> torch.Tensor:
        """theta_s [B, L, width] after `iterations` refinement passes (default: the config's)."""
        self._check_features(features)
        s = self.config.iterations if iterations is None else int(iterations)
        if s < 0:
            raise HDBError(f"iterations must be 0 or more (got {s}).")
        dtype = self.image_proj.weight.dtype
        memory = self.image_proj(self.image_norm(features.to(dtype)))
        memory_kv = [blk.cross_attn.keys_values(memory) for blk in self.blocks]  # image encoded once
        theta = features.new_zeros(features.shape[0], len(self.layers), self.config.width, dtype=dtype)
        for _ in range(s):
            x = self.layer_embed + theta
            for blk, kv in zip(self.blocks, memory_kv):
                x = blk(x, kv)
            theta = theta + self.delta(self.delta_norm(x))
        return theta

    def heads_from(self, theta: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """group key -> (A [B, L_g, a_l, r], B [B, L_g, r, b_l]) from weight features theta [B, L, width]."""
        r = self.lidb_config.rank
        out = {}
        for key, weight in self.heads.items():
            a_l, b_l = self.group_dims[key]
            idx = self.group_layers[key]
            t = theta[:, idx[0]:idx[-1] + 1] if _contiguous(idx) else \
                theta.index_select(1, torch.tensor(idx, device=theta.device))
            y = torch.einsum("bld,ldo->blo", t, weight)
            a = y[..., : a_l * r].reshape(*y.shape[:2], a_l, r) + getattr(self, f"offset_a_{key}")
            b = y[..., a_l * r:].reshape(*y.shape[:2], r, b_l) + getattr(self, f"offset_b_{key}")
            out[key] = (a, b)
        return out

    @torch.no_grad()
    def set_offset(self, a_train: Mapping[str, torch.Tensor], b_train: Mapping[str, torch.Tensor]) -> None:
        """The point predictions start from and move away from: {name: A [a_l, r]}, {name: B [r, b_l]}."""
        for key, idx in self.group_layers.items():
            names = [self.layers[i].name for i in idx]
            getattr(self, f"offset_a_{key}").copy_(torch.stack([a_train[n].float() for n in names]))
            getattr(self, f"offset_b_{key}").copy_(torch.stack([b_train[n].float() for n in names]))

    def forward(self, features: torch.Tensor, iterations: int | None = None
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(a_train {name: [B, a_l, r]}, b_train {name: [B, r, b_l]}) for a batch of B photos."""
        return self.ungroup(self.heads_from(self.weight_features(features, iterations)))

    def ungroup(self, grouped) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        a_train, b_train = {}, {}
        for key, (a, b) in grouped.items():
            for j, i in enumerate(self.group_layers[key]):
                name = self.layers[i].name
                a_train[name], b_train[name] = a[:, j], b[:, j]
        return a_train, b_train
