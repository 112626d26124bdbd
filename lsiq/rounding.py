"""Learned rounding (SignRound, AutoRound's method): an offset per weight, in grid steps, added
before rounding, so training chooses for each weight whether it rounds up or down.

code = clamp(round(w / s + v) + z, 0, 2^b - 1) with v = v0 + dv, dv learnable in [-0.5, 0.5] and
zero at the start. v0 is where rounding starts: zero (round to nearest) or any other rounding of
the same grid, such as GPTQ's (lsiq.methods.lsir: v0 = (Q - W) / s), which dv then adjusts.
"""

from __future__ import annotations

import torch
from torch import nn


class RoundingOffsets(nn.Module):
    """The offsets of one linear weight [out, in]."""

    def __init__(self, shape: torch.Size | tuple[int, int], init: torch.Tensor | None = None) -> None:
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(shape))
        if init is not None and tuple(init.shape) != tuple(shape):
            raise ValueError(f"rounding offsets init has shape {tuple(init.shape)}, expected {tuple(shape)}")
        self.register_buffer("start", None if init is None else init.detach().clone().float())

    def forward(self) -> torch.Tensor:
        return self.delta if self.start is None else self.start + self.delta

    @torch.no_grad()
    def project(self) -> None:
        self.delta.clamp_(-0.5, 0.5)
