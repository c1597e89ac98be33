"""The .safetensors layout of a hypernetwork file.

  tensors   the network's state dict (float32). The transformer: heads stacked per (a_l, b_l)
            group, offset_a/b_<group> (absent in older files: zero). The subspace hypernetwork:
            coordinates.weight/bias, feature_mean/spread, subspace_mean, subspace_directions
  metadata  format, format_version, config (JSON: width/depth/heads/iterations/mlp_ratio; a subspace
            hypernetwork's: kind "subspace_linear" and components, format_version 2),
            layers (JSON [[name, in, out], ...]), a, b, rank, seed, aux_generator, arch,
            base_model, encoder (JSON EncoderSpec), info (JSON, free-form: how it was
            trained), created_by, family (DiT families: "Flux.1", "SD3.5", ...; also in info,
            which is where readers take it from; older files have none)

The target list and a/b/rank/seed are the architecture signature: a predicted
LiDB only means something for that base model and those aux bases. The encoder
entry says which features the network was trained on (hidden size, token count,
hidden state, preprocessing) and is compared with the connected encoder before use.
"""
from __future__ import annotations

import json
from typing import Mapping

import torch
from safetensors.torch import save_file

from hdb_core.lidb import aux_bases
from hdb_core.atomic import write_atomic
from hdb_core.errors import HDBError
from hdb_core.hypernet.model import HyperNetConfig, HyperNetwork, LiDBPredictor
from hdb_core.hypernet.subspace_model import KIND as SUBSPACE_KIND
from hdb_core.hypernet.subspace_model import SubspaceHyperNetwork, SubspaceNetConfig
from hdb_core.hypernet.image_encoder import EncoderSpec
from hdb_core.lidb.weights import LiDBConfig
from hdb_core.storage import check_version, file_error, read
from hdb_core.lidb.targets import LayerSpec, describe

FORMAT_NAME = "hyperdreambooth.hypernet"
FORMAT_VERSION = 2      # 2: subspace hypernetworks; transformer files are still written as version 1
PACK_NAME = "ComfyUI-HyperDreamBooth"


def hypernet_metadata(net: LiDBPredictor, meta: Mapping[str, str] | None = None) -> dict[str, str]:
    c = net.lidb_config
    info = {**net.info, **(meta or {})}
    base_model = str(info.pop("base_model", net.base_model) or "")
    return {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION if isinstance(net, SubspaceHyperNetwork) else 1),
        "config": json.dumps(net.config.to_dict(), sort_keys=True),
        "layers": json.dumps([[s.name, s.in_features, s.out_features] for s in net.layers], separators=(",", ":")),
        "a": str(c.a), "b": str(c.b), "rank": str(c.rank), "seed": str(c.seed),
        "aux_generator": aux_bases.GENERATOR_VERSION,
        "arch": describe(net.layers, info.get("family")),
        "base_model": base_model,
        "encoder": json.dumps(net.encoder.to_dict(), sort_keys=True),
        "info": json.dumps({str(k): str(v) for k, v in info.items()}, sort_keys=True),
        "created_by": PACK_NAME,
        **({"family": str(info["family"])} if info.get("family") else {}),
    }


def save_hypernet(net: LiDBPredictor, path: str, meta: Mapping[str, str] | None = None) -> str:
    """Write atomically; `meta` is free-form training info (a 'base_model' entry becomes the base-model hint)."""
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in net.state_dict().items()}
    if not all(torch.isfinite(t).all() for t in tensors.values()):
        raise HDBError("This hypernetwork has NaN or Inf weights and was not saved; training diverged, "
                       "lower the learning rate and train again.")
    metadata = hypernet_metadata(net, meta)
    return write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


_fail = file_error


def read_hypernet_metadata(path: str) -> dict[str, str]:
    """The metadata alone (cheap: no tensors are read), validated for format and version."""
    meta, _ = _open(path, tensors=False)
    return meta


def _open(path: str, tensors: bool):
    return read(path, lambda meta: _check_format(path, meta), "hypernetwork files in ComfyUI/models/hyperdreambooth/",
                "download or save it again", tensors=tensors)


def _check_format(path: str, meta: Mapping[str, str]) -> None:
    fmt = meta.get("format")
    if fmt != FORMAT_NAME:
        if fmt == "hyperdreambooth.lidb":
            raise _fail(path, "is a LiDB (one identity), not a hypernetwork; load it with Load LiDB and put "
                              "hypernetwork files in models/hyperdreambooth.")
        raise _fail(path, "is a safetensors file but not a HyperDreamBooth hypernetwork (its metadata has no "
                          f"format '{FORMAT_NAME}'); put only hypernetwork files in models/hyperdreambooth.")
    check_version(path, meta, "hypernetwork", FORMAT_VERSION)


def load_hypernet(path: str, device: str | torch.device = "cpu") -> LiDBPredictor:
    """Read and validate a hypernetwork file; every problem becomes a one-sentence HDBError."""
    meta, tensors = _open(path, tensors=True)
    try:
        config_dict = json.loads(meta["config"])
        subspace = config_dict.get("kind") == SUBSPACE_KIND
        config = (SubspaceNetConfig if subspace else HyperNetConfig).from_dict(config_dict)
        layers = tuple(LayerSpec(str(n), int(i), int(o)) for n, i, o in json.loads(meta["layers"]))
        lidb_config = LiDBConfig(a=int(meta["a"]), b=int(meta["b"]), rank=int(meta["rank"]), seed=int(meta["seed"]))
        encoder = EncoderSpec.from_dict(json.loads(meta["encoder"]))
        info = json.loads(meta.get("info", "{}"))
    except (KeyError, ValueError, TypeError) as e:
        raise _fail(path, f"has damaged hypernetwork metadata ({type(e).__name__}: {e}); "
                          f"download or save it again.") from None
    if not layers or lidb_config.rank < 1 or lidb_config.a < 1 or lidb_config.b < 1:
        raise _fail(path, "has damaged hypernetwork metadata (empty layer list or zero rank); "
                          "download or save it again.")
    with torch.device("meta"):
        net = (SubspaceHyperNetwork if subspace else HyperNetwork)(config, layers, lidb_config, encoder)
    expected = net.state_dict()
    for key in expected:      # files written before offsets existed predict from zero, as they were trained
        if key.startswith("offset_") and key not in tensors:
            tensors[key] = torch.zeros(expected[key].shape)
    bad = sorted(set(expected) ^ set(tensors))
    bad += [k for k in expected if k in tensors and tuple(tensors[k].shape) != tuple(expected[k].shape)]
    if bad:
        raise _fail(path, f"has weights that do not match its own configuration (first: {bad[0]}); "
                          f"the file is damaged, download or save it again.")
    if not all(torch.isfinite(t).all() for t in tensors.values()):
        raise _fail(path, "contains NaN or Inf weights; it came from a diverged training run, train it again.")
    net = net.to_empty(device=device)
    net.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    net.base_model = meta.get("base_model", "")
    net.info = {str(k): str(v) for k, v in info.items()} if isinstance(info, dict) else {}
    return net.eval()
