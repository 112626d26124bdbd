"""LSI, learnable singular-value increments (paper 000/004), and SDE, its expansion beyond the
diagonal (CQE+, paper 001).

W = U diag(S) V^T (thin SVD, computed once per block: in float64 on CPU, in float32 on a GPU,
where float64 runs at a small fraction of the float32 rate; by default through the Gram matrix's
eigenproblem, :func:`gram_svd`; the factors only set the directions of the increment, the base
weight stays exact). The calibrated weight is
W' = U diag(S + dS) V^T (+ U_k B V_k^T with an optional learnable k x k block B on the top-left
of the singular-value matrix), evaluated as W + U diag(dS) V^T (+ U_k B V_k^T) so that dS = 0
reproduces W bit for bit. dS and B start at zero.

SDE (Singular-value Diagonal Expansion) makes K bands on each side of the diagonal learnable too:
W' = U (diag(S + dS) + sum_{0<|o|<=K} diag_o(e_o)) V^T, e_o zero-initialised. The structure is
unconfirmed in the paper's abstract; banded is the choice here, a top-left block is
LSI's ``block_k``. With K = 0 it is LSI; with the bands frozen at zero it computes LSI's weight bit
for bit (adding zeros). U diag_o(e_o) is U's columns shifted by o and scaled, so the bands fold into
the one [out x r] x [r x in] product LSI already pays for.
"""

from __future__ import annotations

import torch
from torch import nn

from lsiq.config import SVD_METHODS  # noqa: E402, F401 - the names, kept torch-free there


def svd_dtype(device: torch.device) -> torch.dtype:
    """The SVD's working dtype by default: float64 on a CPU, float32 on a GPU (float64 runs at
    1/64-1/2 of the float32 rate there)."""
    return torch.float64 if device.type == "cpu" else torch.float32


def svd_factors(weight: torch.Tensor, method: str = "gram", dtype: torch.dtype | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD (U, S, V^T) of ``weight`` computed in ``dtype`` (default :func:`svd_dtype`),
    returned in the weight's dtype, row-major. ``method``: "full" is LAPACK's/cuSOLVER's SVD;
    "gram" (:func:`gram_svd`) reaches the same factors through the symmetric eigenproblem of the
    smaller Gram matrix, a fraction of the SVD's slow (non-matmul) work."""
    if method not in SVD_METHODS:
        raise ValueError(f"svd method must be one of {', '.join(SVD_METHODS)}, got {method!r}")
    dtype = dtype or svd_dtype(weight.device)
    if method == "gram":
        u, s, vh = gram_svd(weight.detach().to(dtype))
    else:
        u, s, vh = torch.linalg.svd(weight.detach().to(dtype), full_matrices=False)
    # LAPACK hands U and V^T back column-major; make them row-major so that a collective that
    # sends raw memory (torch.distributed broadcast) sends the same matrix it is given
    return (u.to(weight.dtype).contiguous(), s.to(weight.dtype).contiguous(), vh.to(weight.dtype).contiguous())


def gram_svd(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ``w`` [m, n] from the eigenvectors of the smaller Gram matrix.

    With A the orientation of ``w`` whose rows are the shorter side (A = W, or W^T when m > n;
    A is [k, N], k = min(m, n)): A A^T = U diag(S^2) U^T (symmetric eigensolver, descending), then
    the rows of P = U^T A are S_i V_i^T, so S_i = ||P_i|| and V_i^T = P_i / S_i. Cost: two
    [k, k] x [k, N] matmuls (4 k^2 N FLOPs, at matmul speed) and a k x k eigenproblem (~9 k^3,
    Golub & Van Loan), against the R-SVD's 6 N k^2 + 20 k^3 at factorisation speed.
    Precision: the Gram matrix squares the condition number, so the eigensolver resolves the
    directions of small singular values to ~eps * S_max^2 / (S_i * gap). In float64 (a CPU's
    default) that is far below float32's full SVD. In float32 (a GPU's default) V's rows lose
    orthogonality in those directions: |V V^T - I| up to 0.33 on SmolLM2's q_proj and 0.06 on
    o_proj (condition numbers 3e3-5e3), 3e-5 on the other linears, against 2e-6 for float32's full
    SVD; S stays within 4e-5 S_max. LSI keeps the base weight exact (SVDIncrement): the factors
    only set the increments' directions (perplexity with either: BENCHMARKS.md)."""
    tall = w.shape[0] > w.shape[1]
    a = w.T if tall else w
    _, u = torch.linalg.eigh(a @ a.T)  # ascending eigenvalues
    u = u.flip(-1)
    p = u.T @ a
    s = torch.linalg.vector_norm(p, dim=1)
    p /= torch.where(s > 0, s, torch.ones_like(s)).unsqueeze(1)  # a zero row (rank deficiency) stays zero
    return (p.T, s, u.T) if tall else (u, s, p)


def svd_flops(out_features: int, in_features: int, method: str = "full") -> int:
    """FLOPs of a thin SVD's factorisation, the part that runs far below matmul speed: the R-SVD's
    6 m n^2 + 20 n^3 (m >= n; Golub & Van Loan) for "full", the symmetric eigensolver's 9 n^3 for
    "gram" (whose matmuls are :func:`svd_matmul_flops`)."""
    m, n = max(out_features, in_features), min(out_features, in_features)
    return 9 * n**3 if method == "gram" else 6 * m * n * n + 20 * n**3


def svd_matmul_flops(out_features: int, in_features: int, method: str = "full") -> int:
    """FLOPs of the Gram SVD's two matmuls (A A^T and U^T A: 4 n^2 m, m >= n); 0 for "full"."""
    m, n = max(out_features, in_features), min(out_features, in_features)
    return 4 * n * n * m if method == "gram" else 0


def svd_owners(shapes: dict[str, tuple[int, int]], world: int, method: str = "full") -> dict[str, int]:
    """Which data-parallel worker computes each linear's SVD: largest first, to the least loaded
    worker (ties to the lowest rank), so that the slowest worker's share is as small as it gets."""
    load = [0] * world
    owners = {}
    for name in sorted(shapes, key=lambda k: (-svd_flops(*shapes[k], method), k)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += svd_flops(*shapes[name], method)
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
