"""The subspace hypernetwork: one linear map from a photo's features to identity-subspace coordinates.

    x     = the photo's image features, every token, standardised    [tokens * hidden]
    c     = W x + c0                                                  [k]
    LiDB  = subspace mean + c @ directions                            (`subspace.rows_of` layout)

The subspace is the mean and top k principal directions of the stage-0 LiDBs
(`IdentitySubspace`, each direction times its spread). Standardising with the training
photos' mean and spread (`set_feature_statistics`) shows the map how a face differs
from the average face rather than what every face shares. W and c0 start at zero, so
an untrained network predicts the mean stage-0 LiDB.

Why it exists: in the evidence world a stage-0 LiDB is mostly its own optimisation
noise, and the paper's transformer, regressing onto those LiDBs, predicted little
identity for new people; this map, trained through the diffusion term alone (stage 1
with beta 0), chooses the k coordinates that reconstruct the photo, and its prediction
alone identifies new people (docs/evidence.md).

Several photos of one person: the mean of their coordinates (the map is linear, so
the coordinates of their mean features); the result stays a rank-1 LiDB of the
subspace. There are no refinement passes: `iterations` is accepted and ignored.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from torch import nn

from hdb_core.errors import HDBError
from hdb_core.hypernet.image_encoder import EncoderSpec
from hdb_core.hypernet.model import LiDBPredictor
from hdb_core.lidb.subspace import IdentitySubspace, row_width, split_rows
from hdb_core.lidb.targets import LayerSpec
from hdb_core.lidb.weights import LiDBConfig

KIND = "subspace_linear"


@dataclass(frozen=True)
class SubspaceNetConfig:
    components: int = 128

    def __post_init__(self):
        if int(self.components) < 1:
            raise ValueError("SubspaceNetConfig.components must be at least 1")

    def to_dict(self) -> dict:
        return {"kind": KIND, "components": int(self.components)}

    @classmethod
    def from_dict(cls, d: Mapping) -> "SubspaceNetConfig":
        return cls(components=int(d["components"]))


class SubspaceHyperNetwork(LiDBPredictor):
    """Predicts a LiDB in an identity subspace from CLIP vision features (see the module doc)."""

    def __init__(self, config: SubspaceNetConfig, layers: Iterable[LayerSpec], lidb_config: LiDBConfig,
                 encoder: EncoderSpec):
        super().__init__(layers, lidb_config, encoder)
        self.config = config
        inputs = encoder.num_tokens * encoder.hidden_size
        width = row_width(self.layers, lidb_config)
        self.register_buffer("feature_mean", torch.zeros(inputs))
        self.register_buffer("feature_spread", torch.ones(inputs))
        self.register_buffer("subspace_mean", torch.zeros(width))
        self.register_buffer("subspace_directions", torch.zeros(config.components, width))
        self.coordinates = nn.Linear(inputs, config.components)
        nn.init.zeros_(self.coordinates.weight)
        nn.init.zeros_(self.coordinates.bias)

    @torch.no_grad()
    def set_subspace(self, subspace: IdentitySubspace) -> None:
        if tuple(subspace.layers) != self.layers or subspace.config != self.lidb_config:
            raise HDBError("This identity subspace was fit to LiDBs of another model or other a/b/rank/seed "
                           "settings than the hypernetwork's; fit it to the stage-0 LiDBs it trains on.")
        if subspace.components != self.config.components:
            raise HDBError(f"This identity subspace has {subspace.components} directions but the hypernetwork "
                           f"{self.config.components}; fit it to at least {self.config.components + 1} LiDBs.")
        self.subspace_mean.copy_(subspace.mean)
        self.subspace_directions.copy_(subspace.directions)

    def subspace(self) -> IdentitySubspace:
        """The identity subspace the network predicts in (finetune from its prediction within it)."""
        return IdentitySubspace(self.layers, self.lidb_config, self.subspace_mean.detach().float().cpu(),
                                self.subspace_directions.detach().float().cpu(), {})

    @torch.no_grad()
    def set_feature_statistics(self, mean: torch.Tensor, spread: torch.Tensor) -> None:
        """Per-number mean and spread of the training photos' features [tokens, hidden] (or flattened)."""
        self.feature_mean.copy_(mean.flatten())
        self.feature_spread.copy_(spread.flatten().clamp_min(1e-6))

    def coordinates_of(self, features: torch.Tensor) -> torch.Tensor:
        """[B, k] from features [B, n * tokens, hidden] (n photos per row, as stage 1 and `predict_lidb` give)."""
        self._check_features(features)
        if features.shape[1] % self.encoder.num_tokens:
            raise HDBError(f"The hypernetwork expects {self.encoder.num_tokens} image tokens per photo from "
                           f"{self.encoder.name}, but got {features.shape[1]}; connect the CLIP vision model it "
                           f"was trained with.")
        x = features.reshape(features.shape[0], -1, self.feature_mean.shape[0]).to(self.feature_mean.dtype)
        x = ((x - self.feature_mean) / self.feature_spread).mean(1)
        return self.coordinates(x.to(self.coordinates.weight.dtype))

    def forward(self, features: torch.Tensor, iterations: int | None = None
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        coordinates = self.coordinates_of(features).to(self.subspace_mean.dtype)
        rows = self.subspace_mean + coordinates @ self.subspace_directions
        return split_rows(rows, self.layers, self.lidb_config)
