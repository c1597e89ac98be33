"""What every training command shares: processes, precision, the state folder, the loss log.

One rule for run state: a command writing `OUT` (a folder of LiDBs or a hypernetwork
file) keeps its checkpoints, loss log, plot and summaries in `OUT.state/` beside it,
so a re-run with the same OUT resumes and the output folder holds only results.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from hdb_core.atomic import write_atomic
from hdb_core.errors import HDBError
from hdb_core.training.data import FACE_CHECKS

DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


AUTOCAST = ("auto", "bf16", "off")


def check_shared_options(settings) -> None:
    """The options the `hdb` stages share (those `settings` has), each refused in one sentence."""
    if settings.resolution < 64 or settings.resolution % 64:
        raise HDBError(f"resolution {settings.resolution} is not a multiple of 64 (at least 64); use 512 for SD1.5.")
    if getattr(settings, "checkpoint_every", 1) < 1:
        raise HDBError(f"checkpoint interval is {settings.checkpoint_every}; use 1 or more steps.")
    if settings.face_check not in FACE_CHECKS:
        raise HDBError(f"face check must be one of {', '.join(FACE_CHECKS)}, not {settings.face_check!r}.")
    if settings.dtype not in DTYPES:
        raise HDBError(f"dtype must be one of {', '.join(DTYPES)}, not {settings.dtype!r}.")
    if getattr(settings, "autocast", "off") not in AUTOCAST:
        raise HDBError(f"autocast must be one of {', '.join(AUTOCAST)}, not {settings.autocast!r}.")


def autocast(name: str, device: torch.device):
    """bf16 autocast of a training forward: 'auto' turns it on where a CUDA card has bf16, never on a CPU."""
    on = name == "bf16" or (name == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The frozen models' dtype: 'auto' is bf16 on a CUDA card that has it, else float32."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return DTYPES[name]


@dataclass
class ProcessInfo:
    """Which slice of the work this process owns (from accelerate, or 0 of 1)."""

    index: int = 0
    count: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def from_accelerate(cls, cpu: bool = False) -> "ProcessInfo":
        from accelerate import PartialState

        state = PartialState(cpu=bool(cpu))
        return cls(state.process_index, state.num_processes, state.device)

    def wait(self) -> None:
        """Barrier across processes (nothing to wait for in a single process)."""
        if self.count > 1:
            from accelerate import PartialState

            PartialState().wait_for_everyone()


def shard(items: list, info: ProcessInfo) -> list:
    """Process k of n takes items k, k+n, ...: every item exactly once across processes."""
    return items[info.index::info.count]


def state_dir(output: str) -> str:
    """`OUT.state` beside the output folder or file (its extension dropped)."""
    base = os.path.normpath(output)
    if base.endswith(".safetensors"):
        base = base[: -len(".safetensors")]
    return base + ".state"


def write_json(path: str, obj) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
    write_atomic(path, write)


class LossLog:
    """Append-only CSV of training losses, flushed every row (it survives a kill)."""

    def __init__(self, path: str, header: list[str]):
        self.path, self.header = path, header
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if not os.path.exists(path):
            with open(path, "w", newline="") as f:
                csv.writer(f).writerow(header)

    def rows(self) -> list[dict]:
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))

    def keep(self, predicate: Callable[[dict], bool]) -> None:
        """Drop rows a resumed run will redo (rows logged after the checkpoint it resumes from)."""
        rows = [r for r in self.rows() if predicate(r)]

        def write(tmp):
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, self.header)
                w.writeheader()
                w.writerows(rows)
        write_atomic(self.path, write)

    def append(self, *values) -> None:
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow(values)
            f.flush()


def loss_curve(path: str, column: str = "loss") -> list[float]:
    """Mean of `column` per step of a loss log (stage 0 logs one row per chunk and step); [] if absent."""
    if not os.path.exists(path):
        return []
    by_step: dict[int, list[float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            by_step.setdefault(int(row["step"]), []).append(float(row[column]))
    return [sum(v) / len(v) for _, v in sorted(by_step.items())]
