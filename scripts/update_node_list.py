"""Regenerate node_list.json: the pack's node ids for ComfyUI-Manager.

Manager's scanner finds nodes by reading NODE_CLASS_MAPPINGS in the source; V3
nodes (declared with io.Schema(node_id=...)) are invisible to it, so without this
file "Install Missing Custom Nodes" cannot point users at this pack. Run after
adding or renaming a node:  .venv/bin/python scripts/update_node_list.py
(tests/test_packaging.py fails while the file is out of date).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def pack_nodes() -> dict[str, str]:
    """{node_id: one-line description} of every node the pack registers (dev nodes excluded)."""
    from devtools import comfy_runtime

    state = comfy_runtime.boot(tempfile.mkdtemp(prefix="hdb-nodelist-"))
    out = {}
    for node_id in state["hdb_nodes"]:
        if node_id.startswith("HDBDev_"):  # development-only nodes, never in users' graphs
            continue
        schema = state["nodes"].NODE_CLASS_MAPPINGS[node_id].GET_SCHEMA()
        out[node_id] = f"{schema.display_name}: {schema.description}"
    return dict(sorted(out.items()))


def main() -> None:
    path = os.path.join(REPO, "node_list.json")
    text = json.dumps(pack_nodes(), indent=2, ensure_ascii=False) + "\n"
    from hdb_core.atomic import write_atomic

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    write_atomic(path, write)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
