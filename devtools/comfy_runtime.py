"""Boot a real ComfyUI in this process (CPU) and run API-format prompts through its executor.

COMFYUI_PATH selects a ComfyUI checkout; without it, the copy that
scripts/setup.sh provisions under .comfyui/ is used.
"""
from __future__ import annotations

import asyncio
import os
import sys
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_state: dict = {}


def comfy_path() -> str:
    path = os.environ.get("COMFYUI_PATH") or os.path.join(REPO, ".comfyui")
    if not os.path.isfile(os.path.join(path, "main.py")):
        raise RuntimeError(f"no ComfyUI at {path}: run scripts/setup.sh or set COMFYUI_PATH")
    return os.path.abspath(path)


def boot(base_directory: str, cpu: bool = True) -> dict:
    """Import ComfyUI (with --cpu unless `cpu` is False), models/output under `base_directory`, and load
    this pack.

    Returns {'pack': the pack module, 'nodes': ComfyUI's nodes module, ...}. Idempotent.
    """
    if _state:
        return _state
    path = comfy_path()
    if path not in sys.path:
        sys.path.insert(0, path)
    import comfy.options  # noqa: F401  (argument parsing stays disabled: pytest owns argv)
    from comfy.cli_args import args

    args.cpu = cpu
    args.base_directory = base_directory
    args.use_pytorch_cross_attention = True
    for d in ("models", "output", "input", "temp", "user", "custom_nodes"):
        os.makedirs(os.path.join(base_directory, d), exist_ok=True)

    import utils.extra_config  # noqa: F401  (must precede `nodes`, as main.py does)
    import folder_paths
    import nodes
    import execution

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    before = set(nodes.NODE_CLASS_MAPPINGS)
    ok = asyncio.run(nodes.load_custom_node(REPO))
    if not ok:
        raise RuntimeError("ComfyUI could not import the HyperDreamBooth pack (see the log above)")
    pack = sys.modules[REPO.replace(".", "_x_")]
    hdb_nodes = sorted(set(nodes.NODE_CLASS_MAPPINGS) - before)
    from . import dev_nodes

    dev_nodes.register(nodes)
    _state.update(pack=pack, nodes=nodes, execution=execution, folder_paths=folder_paths,
                  hdb_nodes=hdb_nodes, base=base_directory)
    return _state


class _ServerStub:
    """What PromptExecutor needs from PromptServer: a client id and a message sink."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.messages: list = []
        self.timeline: list = []  # (monotonic time, node id) at each node start; None marks the end

    def send_sync(self, event, data, sid=None):
        import time

        self.messages.append((event, data))
        if event == "executing":
            self.timeline.append((time.monotonic(), data.get("node") if isinstance(data, dict) else None))


class PromptResult:
    def __init__(self, executor, server, prompt_id):
        self.success = executor.success
        self.messages = executor.status_messages + server.messages
        self.timeline = server.timeline
        self.outputs = executor.history_result.get("outputs", {}) if executor.history_result else {}
        self.executor = executor
        self.prompt_id = prompt_id

    @property
    def error(self) -> dict | None:
        for event, data in self.messages:
            if event in ("execution_error", "execution_interrupted"):
                return data
        return None

    def node_seconds(self) -> dict[str, float]:
        """Wall time each executed node took (from the executor's 'executing' events)."""
        out = {}
        for (t0, nid), (t1, _) in zip(self.timeline, self.timeline[1:]):
            if nid is not None:
                out[str(nid)] = out.get(str(nid), 0.0) + t1 - t0
        return out

    def node_output(self, node_id: str):
        """The Python values a node returned (its output tuple), from the executor's cache."""
        entry = self.executor.caches.outputs.get(str(node_id))
        if entry is None:
            return None
        outputs = getattr(entry, "outputs", entry)
        return tuple(o[0] if isinstance(o, list) and len(o) == 1 else o for o in outputs)


def call_node(node_cls, **inputs) -> tuple:
    """Run one node's execute() as the executor would (under inference mode); returns its outputs."""
    import torch

    with torch.inference_mode():
        out = node_cls.execute(**inputs)
    return tuple(out.args)


def run_prompt(prompt: dict, executor=None) -> PromptResult:
    """Validate and execute an API-format prompt; raises on validation failure."""
    execution = _state["execution"]
    prompt_id = str(uuid.uuid4())
    valid = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    if not valid[0]:
        raise ValueError(f"prompt failed validation: {valid[1]} {valid[3]}")
    server = _ServerStub()
    if executor is None:
        executor = execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC,
                                            cache_args={"lru": 0, "ram": 0})
    else:
        executor.server = server
    # A client id makes the executor report each node as it starts (used for timings).
    executor.execute(prompt, prompt_id, {"client_id": "hdb-dev"}, valid[2])
    import time

    server.timeline.append((time.monotonic(), None))
    return PromptResult(executor, server, prompt_id)


def patched_state(patcher):
    """The weights a ModelPatcher would run with (patch, copy, unpatch)."""
    patcher.patch_model()
    try:
        return {k: v.detach().clone() for k, v in patcher.model.state_dict().items()}
    finally:
        patcher.unpatch_model()
