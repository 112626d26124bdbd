"""lsiq: block-wise post-training quantization methods in pure PyTorch.

Quantizers, LWC and LET (OmniQuant), LSI (learnable singular-value increments), GPTQ and RTN
baselines, block calibration and bit packing. No Ray, no storage, no CLI: usable from a notebook.
"""

from lsiq.quantizer import ActQuantizer, QuantSpec, dequantize, fake_quant, minmax_scale_zero, quantize_codes

__all__ = ["ActQuantizer", "QuantSpec", "dequantize", "fake_quant", "minmax_scale_zero", "quantize_codes"]
