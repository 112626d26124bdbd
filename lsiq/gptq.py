"""GPTQ (Frantar et al.): column-by-column quantization with second-order error feedback.

Hessian H = 2 X X^T / n from the layer's cached inputs, damping 1 % of mean(diag H), lazy batch
updates in blocks of columns. Group parameters are taken from the already error-corrected columns
when a group starts (the blocks are aligned to the groups so those columns are up to date).
"""

from __future__ import annotations

import dataclasses

import torch

from lsiq.quantizer import QuantSpec, dequantize, fake_quant, minmax_scale_zero, quantize_codes


class HessianAccumulator:
    """Running H = 2/n sum x x^T over the rows of every input batch a linear sees."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64) -> None:
        self.h = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.h.dtype)
        m = x.shape[0]
        self.h *= self.n / (self.n + m)
        self.n += m
        x = x * (2.0 / self.n) ** 0.5
        self.h += x.T @ x


ACTORDERS = ("static", "none")


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, spec: QuantSpec, damp: float = 0.01,
                  block_size: int = 128, actorder: str = "static") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize weight [out, in] given H [in, in], in H's dtype (float64, or float32 on a GPU:
    lsiq.stats.solve_dtype). Returns (fake-quantized weight, scale, zero).

    ``actorder``: "static" (llm-compressor's default, also called "weight" ordering) quantizes the
    columns in order of decreasing diag(H), so the columns whose errors cost most are fixed while
    the most columns are left to absorb them; each group's scale and zero point are taken up front
    from the FP weight's group (contiguous in the original column order, so the checkpoint needs
    no g_idx). "none": the original GPTQ, in column order, each group's parameters taken from its
    already error-corrected columns when the group starts."""
    if actorder not in ACTORDERS:
        raise ValueError(f"actorder must be one of {', '.join(ACTORDERS)}, got {actorder!r}")
    out_f, in_f = w.shape
    glen = spec.group_len(in_f)
    dtype = h.dtype
    W = w.detach().to(dtype, copy=True)
    H = h.detach().clone()
    del h  # freed here when the caller did not keep it (lsiq.methods.gptq pops it)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if actorder == "static":
        return _gptq_static(w, W, H, spec, damp, block_size)
    if spec.group_size:
        block_size = glen * max(1, block_size // glen)
    hinv = _inverse_cholesky(H, damp)
    del H

    group_spec = dataclasses.replace(spec, group_size=0)  # per-row params of one group's columns
    scales, zeros = [], []
    if not spec.group_size:
        s, z = minmax_scale_zero(W, group_spec)
        scales.append(s[:, 0])
        zeros.append(z[:, 0])
    Q = torch.zeros_like(W)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        err1 = torch.zeros_like(W1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if spec.group_size and (i1 + i) % glen == 0:
                s, z = minmax_scale_zero(W1[:, i:i + glen], group_spec)
                scales.append(s[:, 0])
                zeros.append(z[:, 0])
            s, z = scales[-1], zeros[-1]
            col = W1[:, i:i + 1]
            q = fake_quant(col, s[:, None], z[:, None], group_spec)
            Q1[:, i:i + 1] = q
            err = (col - q) / hinv1[i, i]
            W1[:, i:] -= err @ hinv1[i:i + 1, i:]
            err1[:, i:i + 1] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return _result(w, Q, torch.stack(scales, dim=1), torch.stack(zeros, dim=1), spec)


def _inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp mean(diag H) I)^-1, damped in place (no [in, in] eye)."""
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)


def _gptq_static(w: torch.Tensor, W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, damp: float,
                 block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ in order of decreasing diag(H) with every group's (scale, zero) fixed from the FP weight."""
    in_f = W.shape[1]
    scale_h, zero_h = minmax_scale_zero(W, spec)  # [out, groups], from the weight before any update
    glen = spec.group_len(in_f)
    perm = torch.argsort(torch.diag(H), descending=True, stable=True)
    group = (perm // glen).to(W.device)  # group of each permuted column
    W = W[:, perm]
    H = H[perm][:, perm]
    hinv = _inverse_cholesky(H, damp)
    del H
    s_cols, z_cols = scale_h[:, group], zero_h[:, group]  # [out, in] in the permuted order
    Q = torch.zeros_like(W)
    qmax = spec.qmax
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1 = W[:, i1:i2].clone()
        err1 = torch.zeros_like(W1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = W1[:, i]
            s, z = s_cols[:, i1 + i], z_cols[:, i1 + i]
            q = ((torch.round(col / s) + z).clamp(0, qmax) - z) * s  # the same grid as fake_quant
            Q[:, i1 + i] = q
            err = (col - q) / hinv1[i, i]
            W1[:, i:] -= err[:, None] @ hinv1[i:i + 1, i:]
            err1[:, i] = err
        W[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    Q = Q[:, torch.argsort(perm)]
    return _result(w, Q, scale_h, zero_h, spec)


def _result(w: torch.Tensor, Q: torch.Tensor, scale_h: torch.Tensor, zero_h: torch.Tensor, spec: QuantSpec
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    codes = quantize_codes(Q, scale_h, zero_h, spec)  # Q lies on the grid of its dtype: codes are exact
    scale, zero = scale_h.to(w.dtype), zero_h.to(w.dtype)
    return dequantize(codes, scale, zero, spec, w.dtype), scale, zero
