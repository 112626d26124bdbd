"""Uniform integer quantization primitives: grids, fake quantization with a straight-through
estimator, the integer form (codes, scales, zero points) and dynamic per-token activations.

Convention for every bit width b and both modes: codes are unsigned integers in [0, 2^b - 1] and a
weight is represented as ``(code - zero) * scale``, one (scale, zero) pair per output row and group.
Asymmetric: the group's [xmin, xmax] maps onto [0, 2^b - 1]. Symmetric: zero = 2^(b-1) and
scale = absmax / (2^(b-1) - 1), so the grid is {-2^(b-1), ..., 2^(b-1) - 1} * scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCALE_MIN = 1e-8


@dataclass(frozen=True)
class QuantSpec:
    """How a weight matrix is quantized: bit width, group size along the input dim (0 = per
    output channel) and symmetric or asymmetric grid."""

    bits: int
    group_size: int = 0
    sym: bool = False
    # Smallest zero point of an asymmetric grid. 1 for GPTQ v1 checkpoints, which store zero - 1 in
    # b bits: a zero of 0 would wrap to 2^b - 1 and every loader would read it as 2^b.
    zero_min: int = 0

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"weight bits must be between 2 and 8, got {self.bits}")
        if self.group_size < 0:
            raise ValueError(f"group size must be >= 0 (0 = per channel), got {self.group_size}")
        if not 0 <= self.zero_min < 2**self.bits - 1:
            raise ValueError(f"zero_min must be in [0, {2**self.bits - 2}], got {self.zero_min}")

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    def groups(self, in_features: int) -> int:
        """Number of groups per row; raises a clear error when the group size does not divide."""
        if self.group_size == 0:
            return 1
        if in_features % self.group_size:
            raise ValueError(
                f"group size {self.group_size} does not divide in_features={in_features}; "
                f"choose a divisor of {in_features} (or 0 for per-channel)"
            )
        return in_features // self.group_size

    def group_len(self, in_features: int) -> int:
        return in_features // self.groups(in_features)


def grouped(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """View a [out, in] weight as [out, groups, group_len]."""
    out_f, in_f = w.shape
    return w.reshape(out_f, spec.groups(in_f), spec.group_len(in_f))


class _RoundSTE(torch.autograd.Function):
    """round(x) forward, the identity backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.round()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round with a straight-through gradient (identity in the backward pass). One kernel over the
    tensor where the usual (x.round() - x).detach() + x runs three; the same values bit for bit
    (round(x) - x is exact in floating point, so adding x back gives round(x))."""
    return _RoundSTE.apply(x)


def scale_zero_from_range(xmin: torch.Tensor, xmax: torch.Tensor, spec: QuantSpec,
                          ste: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per group from a clipping range; shapes [out, groups]. Differentiable in
    xmin/xmax (the zero point's rounding uses a straight-through estimator when ``ste``)."""
    rnd = round_ste if ste else torch.round
    if spec.sym:
        absmax = torch.maximum(xmax.abs(), xmin.abs())
        scale = (absmax / (2 ** (spec.bits - 1) - 1)).clamp(min=SCALE_MIN)
        zero = torch.full_like(scale, float(2 ** (spec.bits - 1)))
        return scale, zero
    # Keep 0 inside the range (as GPTQ's quantizer does) so that a one-signed group still has an
    # integer zero point in [0, 2^b - 1] and its values are not shifted.
    xmin, xmax = xmin.clamp(max=0), xmax.clamp(min=0)
    scale = ((xmax - xmin) / spec.qmax).clamp(min=SCALE_MIN)
    zero = rnd(-xmin / scale).clamp(spec.zero_min, spec.qmax)
    return scale, zero


def minmax_scale_zero(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest parameters: the group's min and max (absmax when symmetric)."""
    g = grouped(w, spec)
    return scale_zero_from_range(g.amin(-1), g.amax(-1), spec)


def _codes(g: torch.Tensor, s: torch.Tensor, z: torch.Tensor, v: torch.Tensor | None, qmax: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(clamp(round(g / s + v) + z, 0, qmax), the mask of codes inside [0, qmax] before clamping):
    one temporary, updated in place, in the order of the op-by-op formula (the same bits)."""
    x = g / s
    if v is not None:
        x.add_(v)
    x.round_().add_(z)
    inside = (x >= 0) & (x <= qmax)
    return x.clamp_(0, qmax), inside


class _FakeQuant(torch.autograd.Function):
    """Fake quantization of grouped weights ``g`` [out, groups, len] on the grid (s, z) [out, groups, 1]
    with optional offsets ``v`` (like ``g``), straight-through for rounding: the same values as the
    op-by-op formula, with one hand-written backward instead of autograd's chain of a dozen
    full-size kernels and their saved intermediates (the weight side of a training step).

    y = (q - z) s with q = clamp(round(g/s + v) + z, 0, qmax); with m the mask of unclamped codes:
    dy/dg = m, dy/dv = m s, dy/ds = (q - z) - m g / s, dy/dz = s (m - 1). Saved for the backward:
    the codes (one byte each) and the mask besides g, s and z."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, s: torch.Tensor, z: torch.Tensor, v: torch.Tensor | None,
                qmax: int) -> torch.Tensor:
        q, inside = _codes(g, s, z, v, qmax)
        ctx.save_for_backward(g, s, z, q.to(torch.uint8), inside)
        ctx.has_v = v is not None
        return q.sub_(z).mul_(s)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        g, s, z, codes, inside = ctx.saved_tensors
        need_g, need_s, need_z, need_v = ctx.needs_input_grad[:4]
        gm = torch.where(inside, grad, 0.0)
        grad_s = grad_z = None
        if need_s:
            qz = codes.to(grad.dtype).sub_(z)
            grad_s = (grad * qz).sum(-1, keepdim=True) - (gm * g).sum(-1, keepdim=True) / s
        if need_z:
            grad_z = (gm.sum(-1, keepdim=True) - grad.sum(-1, keepdim=True)) * s
        grad_v = gm * s if need_v and ctx.has_v else None
        return gm if need_g else None, grad_s, grad_z, grad_v, None


def fake_quant(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec,
               offset: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize ``w`` on the grid given by (scale, zero), straight-through for rounding.
    ``offset`` ([out, in], in grid steps) is added before rounding: learned rounding (lsiq.rounding)."""
    g = grouped(w, spec)
    v = grouped(offset, spec) if offset is not None else None
    s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (g, s, z, v)):
        return _FakeQuant.apply(g, s, z, v, spec.qmax).reshape(w.shape)
    with torch.no_grad():
        q, _ = _codes(g, s, z, v, spec.qmax)
        return q.sub_(z).mul_(s).reshape(w.shape)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec,
                   offset: torch.Tensor | None = None) -> torch.Tensor:
    """Integer codes (uint8, [out, in]) of ``w`` on the grid given by (scale, zero), ``offset``
    added before rounding as in :func:`fake_quant`."""
    g = grouped(w.detach(), spec)
    x = g / scale.unsqueeze(-1)
    if offset is not None:
        x = x + grouped(offset.detach(), spec)
    q = (torch.round(x) + zero.unsqueeze(-1)).clamp(0, spec.qmax)
    return q.reshape(w.shape).to(torch.uint8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Weights from codes: ``(code - zero) * scale`` per group. Matches ``fake_quant`` exactly."""
    g = grouped(codes.to(dtype), spec)
    return ((g - zero.to(dtype).unsqueeze(-1)) * scale.to(dtype).unsqueeze(-1)).reshape(codes.shape)


class ActQuantizer(torch.nn.Module):
    """Dynamic per-token asymmetric activation quantizer (OmniQuant's A4/A6/A8); 16 bits = off."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        if bits not in (4, 6, 8, 16):
            raise ValueError(f"activation bits must be one of 4, 6, 8, 16 (off), got {bits}")
        self.bits = bits

    @property
    def enabled(self) -> bool:
        return self.bits < 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        qmax = 2**self.bits - 1
        xmin = x.amin(-1, keepdim=True).clamp(max=0)
        xmax = x.amax(-1, keepdim=True).clamp(min=0)
        scale = ((xmax - xmin) / qmax).clamp(min=SCALE_MIN)
        zero = torch.round(-xmin / scale)
        q = (round_ste(x / scale) + zero).clamp(0, qmax)
        return (q - zero) * scale
