"""An exponential moving average of a network's weights (float32, on the network's device).

Diffusion losses at random timesteps are noisy, so the last optimiser step is a noisy
point; the average over the last ~1/(1-decay) steps is usually the better network.
The decay warms up as min(decay, (1 + t) / (10 + t)), so a short run is not dominated
by the untrained start.
"""
from __future__ import annotations

import copy

import torch


class EMA:
    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        """Fold in the weights after optimiser step `step` (0-based)."""
        keep = min(self.decay, (1 + step) / (10 + step))
        for k, v in module.state_dict().items():
            self.shadow[k].lerp_(v.detach().float(), 1.0 - keep)

    def averaged(self, module: torch.nn.Module) -> torch.nn.Module:
        """A copy of `module` holding the averaged weights (the module itself is left as it is)."""
        twin = copy.deepcopy(module)
        twin.load_state_dict(self.shadow)
        return twin
