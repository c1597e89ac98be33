"""Count the aten ops torch dispatches in a block: on a GPU each is a kernel launch, so the count of a
step's small ops says how long the CPU keeps the GPU waiting, measured on any machine."""
from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode


class OpCount(TorchDispatchMode):
    """`with OpCount() as count: ...`, then `count.ops`."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))
