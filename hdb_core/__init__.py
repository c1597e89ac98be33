"""Plain-torch core of ComfyUI-HyperDreamBooth (no ComfyUI imports here).

    lidb/       what an identity is: LiDB weights, aux bases, targets and names, the file, LoRA export
    hypernet/   the hypernetworks (the transformer and the subspace one), their file, image encoder
    training/   one objective, one injector, data, base model, stage 0, stage 1, fast finetune
    defaults.py the one table of user-facing defaults (node, CLI, workflows and docs read it)
    cli.py      the `hdb` command

The names below are the public API; everything else may move between versions.
"""
from hdb_core.errors import HDBError
from hdb_core.hypernet.file import load_hypernet, save_hypernet
from hdb_core.hypernet.image_encoder import EncoderSpec
from hdb_core.hypernet.model import HyperNetConfig, HyperNetwork
from hdb_core.hypernet.subspace_model import SubspaceHyperNetwork, SubspaceNetConfig
from hdb_core.lidb.file import load_lidb, save_lidb
from hdb_core.lidb.lora_export import save_kohya
from hdb_core.lidb.targets import LayerSpec
from hdb_core.lidb.weights import LiDB, LiDBConfig

__version__ = "0.2.0"
__all__ = ["HDBError", "load_hypernet", "save_hypernet", "EncoderSpec", "HyperNetConfig", "HyperNetwork",
           "SubspaceHyperNetwork", "SubspaceNetConfig",
           "load_lidb", "save_lidb", "save_kohya", "LayerSpec", "LiDB", "LiDBConfig"]
