"""FP8 source checkpoints read as full precision: each float8 weight is dequantized with its scales as
its block streams in, so an FP8 release is calibrated without a bf16 copy of it ever being written.

Two layouts, declared by the source's ``quantization_config``:
- ``quant_method: fp8`` (DeepSeek-V3/R1, Kimi K2): ``X.weight`` float8_e4m3fn plus
  ``X.weight_scale_inv`` float32, one scale per ``weight_block_size`` tile (128 x 128), and
  W = weight * scale_inv of its tile (the name says inverse; the scale multiplies);
- ``quant_method: compressed-tensors`` with float 8-bit weights (``format: float-quantized``):
  ``X.weight`` float8 plus ``X.weight_scale`` per tensor, per output channel or per block
  (``strategy: tensor | channel | block``), W = weight * scale; static ``X.input_scale`` tensors
  (activation scales) are not needed and not read.
Any other quantized source is refused: calibration needs the full-precision weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

FLOAT8 = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
# companions of a quantized weight that are no model parameter of the dequantized model
AUX_SUFFIXES = (".weight_scale_inv", ".weight_scale", ".input_scale")


class SourceQuantError(ValueError):
    """The source declares a quantization this reader cannot undo, or a tensor disagrees with it."""


@dataclass(frozen=True)
class SourceQuant:
    """How a source's float8 weights are stored: the scale tensor's suffix and its tile shape."""

    method: str  # "fp8" | "compressed-tensors"
    scale_suffix: str  # "weight_scale_inv" | "weight_scale"
    block: tuple[int, int] | None  # tile of one scale (rows, columns); None: per tensor or per channel

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SourceQuant | None:
        """The source's FP8 layout from its config.json, or None for a full-precision source."""
        qc = config.get("quantization_config")
        if not qc:
            return None
        method = qc.get("quant_method")
        if method == "fp8":
            if qc.get("fmt", "e4m3") not in ("e4m3", "e5m2"):
                raise SourceQuantError(f"quantization_config: fp8 format {qc.get('fmt')!r} is not e4m3 or e5m2")
            block = qc.get("weight_block_size")
            return cls("fp8", "weight_scale_inv", tuple(block) if block else None)
        if method == "compressed-tensors":
            weights = [g.get("weights") or {} for g in (qc.get("config_groups") or {}).values()]
            if weights and all(w.get("type") == "float" and w.get("num_bits") == 8 for w in weights):
                blocks = {tuple(w["block_structure"]) for w in weights if w.get("strategy") == "block"
                          and w.get("block_structure")}
                if len(blocks) > 1:
                    raise SourceQuantError(f"quantization_config: several FP8 block shapes {sorted(blocks)}")
                return cls("compressed-tensors", "weight_scale", blocks.pop() if blocks else None)
            fmt = qc.get("format")
            raise SourceQuantError(f"the source is already quantized (compressed-tensors, format {fmt!r}): "
                                   "a full-precision (F32/F16/BF16) or FP8 checkpoint is needed")
        raise SourceQuantError(f"the source is already quantized (quant_method {method!r}): a full-precision "
                               "(F32/F16/BF16) or FP8 checkpoint is needed")

    def scale_name(self, weight_name: str) -> str:
        """``a.b.weight`` -> ``a.b.weight_scale_inv`` (or ``weight_scale``)."""
        return weight_name[: -len("weight")] + self.scale_suffix

    def dequantize(self, name: str, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Float32 weight from its float8 values (already cast to float32) and its scales."""
        w, s = weight.float(), scale.float()
        if s.numel() == 1:
            return w * s.reshape(())
        if w.ndim >= 2 and s.ndim == w.ndim and s.shape[-1] == 1 and s.shape[-2] == w.shape[-2]:
            return w * s  # one scale per output channel
        if w.ndim >= 2 and s.ndim == w.ndim and self.block is not None:
            (bm, bn), (m, n) = self.block, w.shape[-2:]
            tiles = (math.ceil(m / bm), math.ceil(n / bn))
            if tuple(s.shape[-2:]) == tiles and s.shape[:-2] == w.shape[:-2]:
                full = s.repeat_interleave(bm, dim=-2).repeat_interleave(bn, dim=-1)
                return w * full[..., :m, :n]
        raise SourceQuantError(f"{name}: scale of shape {list(scale.shape)} does not fit weight {list(weight.shape)} "
                               f"({self.method}, block {self.block})")


def is_aux(name: str) -> bool:
    """A scale that belongs to a quantized weight (not a tensor of the full-precision model)."""
    return name.endswith(AUX_SUFFIXES)
