"""LWC, OmniQuant's learnable weight clipping: per row and group, xmax = sigmoid(u) * max(W) and
xmin = sigmoid(l) * min(W), with u and l learnable and initialised at 4.0 (sigmoid ~ 0.982)."""

from __future__ import annotations

import torch
from torch import nn

from lsiq.quantizer import QuantSpec, fake_quant, grouped, scale_zero_from_range


class LWC(nn.Module):
    """Learnable clipping range for one linear weight of shape [out, in]."""

    def __init__(self, out_features: int, in_features: int, spec: QuantSpec, init: float = 4.0) -> None:
        super().__init__()
        self.spec = spec
        shape = (out_features, spec.groups(in_features))
        self.upbound = nn.Parameter(torch.full(shape, init))
        self.lowbound = nn.Parameter(torch.full(shape, init))

    def scale_zero(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = grouped(w, self.spec)
        xmax = torch.sigmoid(self.upbound) * g.amax(-1)
        xmin = torch.sigmoid(self.lowbound) * g.amin(-1)
        return scale_zero_from_range(xmin, xmax, self.spec, ste=True)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        scale, zero = self.scale_zero(w)
        return fake_quant(w, scale, zero, self.spec)
