"""LWC, OmniQuant's learnable weight clipping: per row and group, xmax = sigmoid(u) * max(W) and
xmin = sigmoid(l) * min(W), with u and l learnable and initialised at 4.0 (sigmoid ~ 0.982)."""

from __future__ import annotations

import torch
from torch import nn

from lsiq.quantizer import QuantSpec, fake_quant, grouped, scale_zero_from_range

PARAMS = ("sigmoid", "linear")


class LWC(nn.Module):
    """Learnable clipping range for one linear weight of shape [out, in].

    ``param`` "sigmoid": OmniQuant's factors sigmoid(u), sigmoid(l), u = l = ``init`` (4.0) at the
    start; "linear": the factors themselves (AutoRound's min/max scales), starting at 1.0, the
    round-to-nearest range, and kept in [0, 1] by :meth:`project` after every step."""

    def __init__(self, out_features: int, in_features: int, spec: QuantSpec, init: float | None = None,
                 param: str = "sigmoid") -> None:
        super().__init__()
        if param not in PARAMS:
            raise ValueError(f"LWC parametrisation must be one of {', '.join(PARAMS)}, got {param!r}")
        self.spec = spec
        self.param = param
        init = (4.0 if param == "sigmoid" else 1.0) if init is None else init
        shape = (out_features, spec.groups(in_features))
        self.upbound = nn.Parameter(torch.full(shape, init))
        self.lowbound = nn.Parameter(torch.full(shape, init))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.param == "sigmoid":
            return torch.sigmoid(self.lowbound), torch.sigmoid(self.upbound)
        return self.lowbound, self.upbound

    @torch.no_grad()
    def project(self) -> None:
        if self.param == "linear":
            self.upbound.clamp_(0.0, 1.0)
            self.lowbound.clamp_(0.0, 1.0)

    def scale_zero(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = grouped(w, self.spec)
        lo, hi = self.factors()
        return scale_zero_from_range(lo * g.amin(-1), hi * g.amax(-1), self.spec, ste=True)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        scale, zero = self.scale_zero(w)
        return fake_quant(w, scale, zero, self.spec)
