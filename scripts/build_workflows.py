"""Regenerate workflows/*.json (UI format, templates), workflows/api/*.json (API twins) and thumbnails."""
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from devtools import comfy_runtime, workflows  # noqa: E402

if __name__ == "__main__":
    state = comfy_runtime.boot(tempfile.mkdtemp(prefix="hdb-build-"))
    for p in workflows.build(state["nodes"].NODE_CLASS_MAPPINGS):
        print("wrote", os.path.relpath(p, comfy_runtime.REPO))
