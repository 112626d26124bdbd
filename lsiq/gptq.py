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


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, spec: QuantSpec, damp: float = 0.01,
                  block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize weight [out, in] given H [in, in], in H's dtype (float64, or float32 on a GPU:
    lsiq.block.solve_dtype). Returns (fake-quantized weight, scale, zero)."""
    out_f, in_f = w.shape
    glen = spec.group_len(in_f)
    if spec.group_size:
        block_size = glen * max(1, block_size // glen)
    dtype = h.dtype
    W = w.detach().to(dtype, copy=True)
    H = h.detach().clone()
    del h  # freed here when the caller did not keep it (lsiq.block._gptq pops it)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))  # H + damp mean(diag H) I, without an [in, in] eye
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

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
    scale_h, zero_h = torch.stack(scales, dim=1), torch.stack(zeros, dim=1)
    codes = quantize_codes(Q, scale_h, zero_h, spec)  # Q lies on the grid of its dtype: codes are exact
    scale, zero = scale_h.to(w.dtype), zero_h.to(w.dtype)
    return dequantize(codes, scale, zero, spec, w.dtype), scale, zero
