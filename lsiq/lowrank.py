"""Low-rank reconstruction of the quantization error (QERA, paper 003, and the two it generalises).

A quantized linear keeps a rank-r correction in 16 bits: y = (W_q + A B) x. With E = W - W_q and
R = E[x x^T] the autocorrelation of the linear's inputs, the output error is
E||(E - C) x||^2 = ||(E - C) R^{1/2}||_F^2, so the best rank-r C is (QERA's closed form)
C = trunc_r(E R^{1/2}) R^{-1/2} (computed with R's Cholesky factor in place of R^{1/2}: the same
C). ``lqer`` keeps only R's diagonal (LQER's activation-scaled SVD), ``svd`` ignores the inputs
(C = trunc_r(E), ZeroQuant-V2). All three return A [out, r] and B [r, in] with the singular values
split evenly between them, so neither factor's range blows up in 16 bits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lsiq.forward import device_of
from lsiq.lsi import svd_owners
from lsiq.parallel import SampleShard, broadcast_from_owners
from lsiq.results import BlockResult
from lsiq.stats import input_autocorrelations, solve_dtype

if TYPE_CHECKING:
    from lsiq.config import CalibConfig

from lsiq.config import LOWRANK_KINDS as KINDS  # noqa: E402 - the names, kept torch-free there


def cholesky_root(r: torch.Tensor, damp: float = 1e-6, dtype: torch.dtype = torch.float64) -> torch.Tensor | None:
    """L, lower triangular, with L L^T = R + d I, in ``dtype``; None when R is zero (inputs that
    are all zero carry no preference between directions).

    An autocorrelation from finitely many tokens is often ill-conditioned or singular (dead input
    channels, fewer tokens than channels), and rounding leaves it slightly indefinite. d starts at
    ``damp`` x the mean of R's diagonal (the mean eigenvalue), which bounds L^{-1} by (d)^{-1/2}
    instead of letting it reach 1/sqrt(rounding noise), and grows 10x until the factorization
    succeeds (float32 rounding can need more than 1e-6 on a badly conditioned R)."""
    r = r.to(dtype)
    if not bool(torch.isfinite(r).all()):
        raise FloatingPointError("the inputs' autocorrelation has NaN or Inf entries")
    mean = r.diagonal().mean()
    if not bool(mean > 0):
        return None
    d = damp * mean.item()
    for _ in range(12):
        a = r.clone()
        a.diagonal().add_(d)
        info = torch.empty((), dtype=torch.int32, device=a.device)
        torch.linalg.cholesky_ex(a, out=(a, info))  # in place: no third [n, n] matrix
        if int(info) == 0:
            return a
        del a
        d *= 10
    raise FloatingPointError(f"the autocorrelation is not positive definite even with {d / 10:.3g} added to its diagonal")


def lowrank_correction(err: torch.Tensor, rank: int, kind: str = "qera", autocorr: torch.Tensor | None = None,
                       damp: float = 1e-6, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """A [out, r], B [r, in] with A B the ``kind`` rank-``rank`` approximation of ``err`` [out, in];
    ``autocorr`` [in, in] is E[x x^T] of the linear's inputs (any positive scale: it cancels).
    Computed in ``dtype`` (float64, or float32 on a GPU: lsiq.stats.solve_dtype). A caller that
    passes ``err`` and ``autocorr`` without keeping them lets both be freed along the way."""
    if kind not in KINDS:
        raise ValueError(f"unknown low-rank method {kind!r}; choose one of {', '.join(KINDS)}")
    if kind != "svd" and autocorr is None:
        raise ValueError(f"{kind} needs the inputs' autocorrelation")
    out_dtype = err.dtype
    e = err.detach().to(dtype)
    del err
    rank = min(rank, *e.shape)
    chol = None
    if kind == "svd":
        left, scale = e, None
    elif kind == "lqer":
        s = autocorr.diagonal().to(dtype).clamp(min=0).sqrt()
        s = s + damp * s.mean() if bool(s.max() > 0) else torch.ones_like(s)  # no signal: plain SVD
        left, scale = e * s, s
    else:
        # QERA's C = trunc_r(E R^{1/2}) R^{-1/2}, with the Cholesky factor L in place of R^{1/2}:
        # any S with S S^T = R gives ||(E - C) S||_F^2 = E||(E - C) x||^2, and S = R^{1/2} Q (Q
        # orthogonal), so trunc_r(E S) S^{-1} is the same C; L costs n^3/3 at matmul speed, the
        # eigendecomposition behind R^{1/2} ~9 n^3 at LAPACK's much lower rate.
        chol = cholesky_root(autocorr.to(e.device), damp, dtype)
        del autocorr  # the last reference when the caller did not keep it
        left, scale = (e @ chol if chol is not None else e), None
    del e
    u, sv, vh = torch.linalg.svd(left, full_matrices=False)
    del left
    root_sv = sv[:rank].sqrt()
    a = u[:, :rank] * root_sv
    b = root_sv[:, None] * vh[:rank]
    del u, vh
    if scale is not None:  # lqer: B diag(1/s)
        b = b * (1 / scale)
    if chol is not None:  # qera: B L^{-1}, a triangular solve of X L = B
        b = torch.linalg.solve_triangular(chol, b, upper=False, left=False)
    return a.to(out_dtype), b.to(out_dtype)


def output_error(err: torch.Tensor, autocorr: torch.Tensor, a: torch.Tensor | None = None,
                 b: torch.Tensor | None = None) -> float:
    """E||(err - A B) x||^2 = trace((err - A B) R (err - A B)^T), with R = ``autocorr``."""
    d = err.to(torch.float64)
    if a is not None:
        d = d - a.to(torch.float64) @ b.to(torch.float64)
    return float(torch.einsum("oi,ij,oj->", d, autocorr.to(torch.float64), d))


@torch.no_grad()
def add_lowrank(layer: nn.Module, inputs: torch.Tensor, layer_kwargs: dict[str, Any], cfg: CalibConfig,
                result: BlockResult, targets: dict[str, torch.Tensor], shard: SampleShard | None = None,
                groups: tuple[tuple[str, ...], ...] | None = None) -> None:
    """Give every linear of ``result`` its rank-``cfg.rank`` correction of (target - quantized weight).

    ``targets``: each linear's full-precision weight in the calibrated block's coordinates (LET
    applied, so with the block's folded norms it computes the FP block); each is dropped from the
    dict once used. The inputs' autocorrelation comes from the quantized block (uncorrected) on the
    quantized stream. A and B are rounded to float16, the precision they are stored in, before
    anything uses them. With data-parallel workers each solves its share of the linears (as the
    SVDs are shared out: svd_owners) and the factors are broadcast from their owners. ``groups``:
    linears that read one input share one autocorrelation (BlockArch.input_groups)."""
    groups = groups if groups is not None else tuple((n,) for n in result.linears)
    autocorr = (input_autocorrelations(layer, inputs, layer_kwargs, cfg, shard, params=result.dequantized_params(),
                                       groups=groups)
                if cfg.lowrank != "svd" else {})  # svd ignores the inputs
    dtype = solve_dtype(cfg, device_of(layer))
    shared = shard is not None and shard.world > 1 and shard.broadcast is not None
    shapes = {name: tuple(q.codes.shape) for name, q in result.linears.items()}
    owners = svd_owners(shapes, shard.world) if shared else dict.fromkeys(shapes, 0)  # cost ~ an SVD each
    me = shard.rank if shared else 0
    failed: Exception | None = None
    try:
        for name, q in result.linears.items():
            if owners[name] != me:  # another worker's: dropped here
                del targets[name]
                autocorr.pop(name, None)
                continue
            # E and R passed on without a reference kept here, so the solve frees them as it goes
            a, b = lowrank_correction(targets.pop(name).to(dtype) - q.dequantize().to(dtype), cfg.rank, cfg.lowrank,
                                      autocorr.pop(name, None), cfg.lowrank_damp, dtype)
            a16, b16 = a.to(torch.float16), b.to(torch.float16)
            if not (torch.isfinite(a16).all() and torch.isfinite(b16).all()):
                raise FloatingPointError(f"{name}: the low-rank correction overflows float16")
            # row-major: LAPACK's factors come column-major, and a broadcast sends raw memory
            q.lowrank_a, q.lowrank_b = a16.to(q.scale.dtype).contiguous(), b16.to(q.scale.dtype).contiguous()
    except Exception as e:  # noqa: BLE001 - re-raised below, on every worker, not only this one
        failed = e
    if shared:  # a failed solve stops every worker before the broadcasts, none waits on it
        flag = torch.tensor([float(failed is not None)], dtype=torch.float64)
        shard.all_reduce(flag, "sum")
        if flag.item() and failed is None:
            raise FloatingPointError("another data-parallel worker's low-rank correction failed")
    if failed is not None:
        raise failed
    if shared:
        def empty(name: str) -> tuple[torch.Tensor, ...]:
            (m, n), scale = shapes[name], result.linears[name].scale
            k = min(cfg.rank, m, n)
            return scale.new_empty(m, k), scale.new_empty(k, n)

        mine = {n: (q.lowrank_a, q.lowrank_b) for n, q in result.linears.items() if owners[n] == me}
        for name, (a, b) in broadcast_from_owners(mine, list(shapes), owners, shard, empty).items():
            result.linears[name].lowrank_a, result.linears[name].lowrank_b = a, b
