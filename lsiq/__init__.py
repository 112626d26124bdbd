"""lsiq: block-wise post-training quantization methods in pure PyTorch.

Quantizers, LWC and LET (OmniQuant), LSI (learnable singular-value increments), GPTQ and RTN
baselines, block calibration and bit packing. No Ray, no storage, no CLI: usable from a notebook.
The quantizer's names below load with torch on first use, so that importing lsiq.config (what the
command lines build their --help from) stays quick.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ActQuantizer", "QuantSpec", "dequantize", "fake_quant", "minmax_scale_zero", "quantize_codes"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from lsiq import quantizer

        return getattr(quantizer, name)
    raise AttributeError(f"module 'lsiq' has no attribute {name!r}")
