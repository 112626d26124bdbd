"""What block calibration produces: the integer form of each linear and the block's other tensors."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lsiq.quantizer import QuantSpec, dequantize, minmax_scale_zero, quantize_codes


@dataclass
class QuantizedLinear:
    """Integer form of one linear: codes [out, in] (uint8), scale and zero [out, groups]; with a
    low-rank correction (lsiq.lowrank), its factors A [out, r] and B [r, in] (16-bit values)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    spec: QuantSpec
    lowrank_a: torch.Tensor | None = None
    lowrank_b: torch.Tensor | None = None

    @classmethod
    def round_to_nearest(cls, w: torch.Tensor, spec: QuantSpec) -> QuantizedLinear:
        """``w`` rounded to nearest on each group's min/max grid (RTN, and its fallbacks)."""
        scale, zero = minmax_scale_zero(w, spec)
        return cls(quantize_codes(w, scale, zero, spec), scale, zero, spec)

    def dequantize(self) -> torch.Tensor:
        """The quantized weight alone: ``(code - zero) * scale``."""
        return dequantize(self.codes, self.scale, self.zero, self.spec)

    def weight(self) -> torch.Tensor:
        """The weight the linear computes with: the quantized weight plus A B when corrected."""
        w = self.dequantize()
        if self.lowrank_a is not None:
            w = w + self.lowrank_a.to(w.dtype) @ self.lowrank_b.to(w.dtype)
        return w


@dataclass
class BlockResult:
    """What calibrating one block produced."""

    linears: dict[str, QuantizedLinear]
    tensors: dict[str, torch.Tensor]  # every other block tensor (LET-folded norms, biases)
    loss_before: float  # round-to-nearest block-output MSE on the calibration samples
    loss_after: float
    losses: list[float] = field(default_factory=list)  # one per optimizer step
    # per-token relative error (lsiq.forward.output_errors) of round-to-nearest and of the result
    rel_before: float = float("nan")
    rel_after: float = float("nan")
    trainable_params: int = 0
    seconds: float = 0.0
    # a mixture-of-experts block (lsiq.moe): tokens routed to each expert, the experts rounded to
    # nearest for lack of them, the units the MLP was calibrated in and their owners
    moe: dict | None = None

    def dequantized_params(self) -> dict[str, torch.Tensor]:
        params = dict(self.tensors)
        for name, q in self.linears.items():
            params[f"{name}.weight"] = q.weight()
        return params
