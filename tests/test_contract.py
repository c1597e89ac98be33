"""The public contract: node ids, input names, types and outputs that saved workflows depend on.

Renaming anything here breaks users' graphs. New inputs may be added only with a default.
"""
import pytest

CONTRACT = {
    "HDB_ApplyLiDB": ({"model": "MODEL", "clip": "CLIP", "lidb": "LIDB", "strength_model": "FLOAT",
                       "strength_clip": "FLOAT"}, ["MODEL", "CLIP"]),
    "HDB_LoadLiDB": ({"lidb_name": "COMBO"}, ["LIDB"]),
    "HDB_SaveLiDB": ({"lidb": "LIDB", "filename_prefix": "STRING"}, []),
    "HDB_ExportLoRA": ({"lidb": "LIDB", "filename_prefix": "STRING"}, []),
    "HDB_FastFinetune": ({"model": "MODEL", "clip": "CLIP", "vae": "VAE", "image": "IMAGE", "init_lidb": "LIDB",
                          "trigger": "STRING", "steps": "INT", "learning_rate": "FLOAT", "relaxed_rank": "INT",
                          "train_text_encoder": "BOOLEAN", "resolution": "INT", "seed": "INT"}, ["LIDB", "IMAGE"]),
    "HDB_LoadHyperNet": ({"hypernet_name": "COMBO"}, ["HYPERNET"]),
    "HDB_PredictLiDBWeights": ({"hypernet": "HYPERNET", "clip_vision": "CLIP_VISION", "image": "IMAGE",
                                "iterations": "INT"}, ["LIDB"]),
    "HDB_FaceCrop": ({"image": "IMAGE", "margin": "FLOAT", "size": "INT"}, ["IMAGE"]),
}
OPTIONAL = {("HDB_FastFinetune", "init_lidb")}


def _inputs(cls):
    info = cls.INPUT_TYPES()
    out = {}
    for section in ("required", "optional"):
        for name, spec in info.get(section, {}).items():
            kind = spec[0] if isinstance(spec[0], str) else "COMBO"
            out[name] = (section, kind, spec[1] if len(spec) > 1 else {})
    return out


@pytest.mark.parametrize("node_id", sorted(CONTRACT))
def test_node_keeps_its_public_contract(comfy, node_id):
    cls = comfy["nodes"].NODE_CLASS_MAPPINGS.get(node_id)
    assert cls is not None, f"{node_id} is not registered"
    wanted, outputs = CONTRACT[node_id]
    have = _inputs(cls)
    for name, kind in wanted.items():
        assert name in have, f"{node_id} lost input {name}"
        assert have[name][1] == kind, f"{node_id}.{name} is {have[name][1]}, expected {kind}"
        assert have[name][0] == ("optional" if (node_id, name) in OPTIONAL else "required")
    for name, (section, _kind, opts) in have.items():
        assert opts.get("tooltip"), f"{node_id}.{name} has no tooltip"
        if name not in wanted and section == "required":
            assert "default" in opts, f"{node_id}.{name} was added without a default"
    assert list(cls.RETURN_TYPES) == outputs
    assert cls.CATEGORY.startswith("HyperDreamBooth")


def test_only_contract_and_dev_nodes_are_registered_by_the_pack(comfy):
    assert set(comfy["hdb_nodes"]) == set(CONTRACT)
