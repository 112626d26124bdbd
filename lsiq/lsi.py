"""LSI, learnable singular-value increments (paper 000/004), and SDE, its expansion beyond the
diagonal (CQE+, paper 001).

W = U diag(S) V^T (thin SVD, computed once per block: in float64 on CPU, in float32 on a GPU,
where float64 runs at a small fraction of the float32 rate; the factors only set the directions
of the increment, the base weight stays exact). The calibrated weight is
W' = U diag(S + dS) V^T (+ U_k B V_k^T with an optional learnable k x k block B on the top-left
of the singular-value matrix), evaluated as W + U diag(dS) V^T (+ U_k B V_k^T) so that dS = 0
reproduces W bit for bit. dS and B start at zero.

SDE (Singular-value Diagonal Expansion) makes K bands on each side of the diagonal learnable too:
W' = U (diag(S + dS) + sum_{0<|o|<=K} diag_o(e_o)) V^T, e_o zero-initialised. The structure is
unconfirmed in the paper's abstract (REFERENCE.md); banded is the choice here, a top-left block is
LSI's ``block_k``. With K = 0 it is LSI; with the bands frozen at zero it computes LSI's weight bit
for bit (adding zeros). U diag_o(e_o) is U's columns shifted by o and scaled, so the bands fold into
the one [out x r] x [r x in] product LSI already pays for.
"""

from __future__ import annotations

import torch
from torch import nn


def svd_factors(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD (U, S, V^T) of ``weight``, returned in its dtype."""
    svd_dtype = torch.float64 if weight.device.type == "cpu" else torch.float32
    u, s, vh = torch.linalg.svd(weight.detach().to(svd_dtype), full_matrices=False)
    # LAPACK hands U and V^T back column-major; make them row-major so that a collective that
    # sends raw memory (torch.distributed broadcast) sends the same matrix it is given
    return (u.to(weight.dtype).contiguous(), s.to(weight.dtype).contiguous(), vh.to(weight.dtype).contiguous())


def svd_flops(out_features: int, in_features: int) -> int:
    """FLOPs of a thin SVD with both factors (Golub & Van Loan's R-SVD count: 6 m n^2 + 20 n^3, m >= n)."""
    m, n = max(out_features, in_features), min(out_features, in_features)
    return 6 * m * n * n + 20 * n**3


def svd_owners(shapes: dict[str, tuple[int, int]], world: int) -> dict[str, int]:
    """Which data-parallel worker computes each linear's SVD: largest first, to the least loaded
    worker (ties to the lowest rank), so that the slowest worker's share is as small as it gets."""
    load = [0] * world
    owners = {}
    for name in sorted(shapes, key=lambda k: (-svd_flops(*shapes[k]), k)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += svd_flops(*shapes[name])
    return owners


class SVDIncrement(nn.Module):
    """Learnable singular-value increment for one linear weight (``factors``: its SVD, when
    computed elsewhere, e.g. by another data-parallel worker)."""

    def __init__(self, weight: torch.Tensor, block_k: int = 0, relative: bool = False,
                 factors: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, band: int = 0) -> None:
        super().__init__()
        u, s, vh = factors if factors is not None else svd_factors(weight)
        dtype = weight.dtype
        # the base is the caller's weight itself, not a copy: one block's weights less in memory
        self.register_buffer("base", weight.detach(), persistent=False)
        self.register_buffer("u", u, persistent=False)
        self.register_buffer("s", s, persistent=False)
        self.register_buffer("vh", vh, persistent=False)
        # relative: the increment is S * delta, so an optimizer step moves every singular value by
        # the same fraction of itself (Adam's steps are ~lr in parameter units whatever the scale).
        self.relative = relative
        self.delta = nn.Parameter(torch.zeros_like(s, dtype=dtype))
        k = min(block_k, s.numel())
        self.block_k = k
        self.block = nn.Parameter(s.new_zeros(k, k, dtype=dtype)) if k > 0 else None
        # SDE: row j of ``bands`` is diagonal offset offsets[j] (+1, -1, +2, -2, ...); entry i sits at
        # M[i, i + o] for o > 0 and M[i - o, i] for o < 0 (only the first r - |o| entries are used).
        r = s.numel()
        self.offsets = [o for k_ in range(1, min(band, r - 1) + 1) for o in (k_, -k_)]
        self.bands = nn.Parameter(s.new_zeros(len(self.offsets), r, dtype=dtype)) if self.offsets else None

    def forward(self) -> torch.Tensor:
        # U diag(dS) V^T costs one [out x r] x [r x in] product; called once per optimizer step.
        d = self.s * self.delta if self.relative else self.delta
        ud = self.u * d
        if self.bands is not None:
            ud = ud + self._band_columns()
        w = self.base + ud @ self.vh
        if self.block is not None:
            k = self.block_k
            w = w + self.u[:, :k] @ self.block @ self.vh[:k]
        return w

    def _band_columns(self) -> torch.Tensor:
        """U @ (sum of the off-diagonal bands): column c gathers u[:, c - o] * e_o[c - o] (o > 0) and
        u[:, c + |o|] * e_o[c] (o < 0)."""
        r = self.s.numel()
        out = torch.zeros_like(self.u)
        for j, o in enumerate(self.offsets):
            n = r - abs(o)
            e = self.bands[j, :n]
            if o > 0:  # M[i, i + o]: column i + o of U M takes u[:, i] * e[i]
                out = out + nn.functional.pad(self.u[:, :n] * e, (o, 0))
            else:  # M[i + |o|, i]: column i takes u[:, i + |o|] * e[i]
                out = out + nn.functional.pad(self.u[:, -o:] * e, (0, -o))
        return out

    def matrix(self) -> torch.Tensor:
        """The learned r x r singular-value matrix M (diag(S + dS), the bands, the k x k block)."""
        d = self.s * self.delta if self.relative else self.delta
        m = torch.diag(self.s + d)
        for j, o in enumerate(self.offsets):
            m = m + torch.diag(self.bands[j, : self.s.numel() - abs(o)], o)
        if self.block is not None:
            k = self.block_k
            m[:k, :k] = m[:k, :k] + self.block
        return m
