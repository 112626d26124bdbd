"""Low-rank reconstruction of the quantization error (QERA, paper 003, and the two it generalises).

A quantized linear keeps a rank-r correction in 16 bits: y = (W_q + A B) x. With E = W - W_q and
R = E[x x^T] the autocorrelation of the linear's inputs, the output error is
E||(E - C) x||^2 = ||(E - C) R^{1/2}||_F^2, so the best rank-r C is (QERA's closed form)
C = trunc_r(E R^{1/2}) R^{-1/2}. ``lqer`` keeps only R's diagonal (LQER's activation-scaled SVD),
``svd`` ignores the inputs (C = trunc_r(E), ZeroQuant-V2). All three return A [out, r] and
B [r, in] with the singular values split evenly between them, so neither factor's range blows up
in 16 bits.
"""

from __future__ import annotations

import torch

KINDS = ("qera", "lqer", "svd")


def sqrt_and_inv_sqrt(r: torch.Tensor, damp: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """R^{1/2} and R^{-1/2} of a symmetric positive semi-definite matrix, in float64.

    An autocorrelation from finitely many tokens is often ill-conditioned or singular (dead input
    channels, fewer tokens than channels). Its eigenvalues are clipped at 0 (rounding makes some
    slightly negative) and raised by ``damp`` x their mean, which bounds R^{-1/2} by
    (damp x mean)^{-1/2} instead of letting it reach 1/sqrt(rounding noise). A zero matrix (inputs
    that are all zero carry no preference between directions) gives the identity for both."""
    n, device = r.shape[0], r.device
    r = r.to(torch.float64)
    lam, q = torch.linalg.eigh((r + r.T) / 2)
    del r  # only q and the results are alive from here (memory: the planner's LOWRANK_TRANSIENT)
    lam = lam.clamp(min=0)
    if not bool(lam.max() > 0):
        eye = torch.eye(n, dtype=torch.float64, device=device)
        return eye, eye
    lam = lam + damp * lam.mean()
    half = (q * lam.sqrt()) @ q.T
    return half, (q * lam.rsqrt()) @ q.T


def lowrank_correction(err: torch.Tensor, rank: int, kind: str = "qera", autocorr: torch.Tensor | None = None,
                       damp: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """A [out, r], B [r, in] with A B the ``kind`` rank-``rank`` approximation of ``err`` [out, in];
    ``autocorr`` [in, in] is E[x x^T] of the linear's inputs (any positive scale: it cancels)."""
    if kind not in KINDS:
        raise ValueError(f"unknown low-rank method {kind!r}; choose one of {', '.join(KINDS)}")
    if kind != "svd" and autocorr is None:
        raise ValueError(f"{kind} needs the inputs' autocorrelation")
    e = err.detach().to(torch.float64)
    rank = min(rank, *e.shape)
    if kind == "svd":
        left, right_inv = e, None
    elif kind == "lqer":
        s = autocorr.diagonal().to(torch.float64).clamp(min=0).sqrt()
        s = s + damp * s.mean() if bool(s.max() > 0) else torch.ones_like(s)  # no signal: plain SVD
        left, right_inv = e * s, torch.diag(1 / s)
    else:
        half, inv_half = sqrt_and_inv_sqrt(autocorr.to(e.device), damp)
        left, right_inv = e @ half, inv_half
    u, sv, vh = torch.linalg.svd(left, full_matrices=False)
    root = sv[:rank].sqrt()
    a = u[:, :rank] * root
    b = root[:, None] * vh[:rank]
    if right_inv is not None:
        b = b @ right_inv
    return a.to(err.dtype), b.to(err.dtype)


def output_error(err: torch.Tensor, autocorr: torch.Tensor, a: torch.Tensor | None = None,
                 b: torch.Tensor | None = None) -> float:
    """E||(err - A B) x||^2 = trace((err - A B) R (err - A B)^T), with R = ``autocorr``."""
    d = err.to(torch.float64)
    if a is not None:
        d = d - a.to(torch.float64) @ b.to(torch.float64)
    return float(torch.einsum("oi,ij,oj->", d, autocorr.to(torch.float64), d))
