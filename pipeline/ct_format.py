"""compressed-tensors ``pack-quantized``: what vLLM serves natively and transformers loads with the
``compressed-tensors`` package. One linear ``X`` is stored as (the compressed-tensors layout):

- ``X.weight_packed``: int32 [out, ceil(in * b / 32)]: the signed values ``q = code - 2^(b-1)``,
  offset back to ``code`` and packed little-endian along the input dim (for 4 and 8 bits this is
  our own bitstream, lsiq.packing);
- ``X.weight_scale``: float32 [out, groups] (one column per channel);
- ``X.weight_zero_point`` (asymmetric only): int32 [ceil(out * b / 32), groups], the signed zero
  ``zero - 2^(b-1)`` packed the same way along the *output* dim;
- ``X.weight_shape``: int64 [2] = [out, in].
A weight is ``(q - zp) * scale`` = ``(code - zero) * scale``, ours exactly. Scales stay float32 so the
file dequantizes to the very weights calibration produced. Weight-only, 4 and 8 bits (vLLM's WNA16
kernels); other settings belong in ``--format gptq`` or ``native``.
"""

from __future__ import annotations

from typing import Any

import torch

from lsiq.arch import BlockArch
from lsiq.packing import pack_codes, unpack_codes
from lsiq.quantizer import QuantSpec
from lsiq.results import QuantizedLinear
from pipeline.native_format import unpack_weight

NAME = "compressed-tensors"
FORMAT = "compressed-tensors-pack-quantized"
# how a user loads the output (OUT: its path), for the last lines of a run
LOAD = ("AutoModelForCausalLM.from_pretrained(OUT) (transformers with compressed-tensors; an asymmetric grid needs "
        "quantization_config=CompressedTensorsConfig(dequantize=True)), or vllm serve OUT")
BITS = (4, 8)
SUFFIXES = (".weight_packed", ".weight_scale", ".weight_zero_point", ".weight_shape")


def check(spec: QuantSpec, abits: int, arch: BlockArch) -> None:
    if spec.bits not in BITS:
        raise ValueError(f"--format compressed-tensors holds 4- and 8-bit weights (pack-quantized, vLLM's WNA16 "
                         f"kernels), not {spec.bits}-bit: use --format gptq (2, 3, 4, 8 bits) or native")
    if abits < 16:
        raise ValueError(f"--format compressed-tensors stores weight-only runs; W{spec.bits}A{abits} needs "
                         "--format native (the one format that keeps activation settings)")


MARKER = ".weight_packed"


def linear_tensors(q: QuantizedLinear) -> dict[str, torch.Tensor]:
    out = {".weight_packed": pack_codes(q.codes, q.spec.bits).cpu(),
           ".weight_scale": q.scale.detach().to(torch.float32).cpu().contiguous(),
           ".weight_shape": torch.tensor(list(q.codes.shape), dtype=torch.int64)}
    if not q.spec.sym:
        zero = q.zero.detach().cpu().to(torch.uint8)  # [out, groups] -> packed along out
        out[".weight_zero_point"] = pack_codes(zero.t().contiguous(), q.spec.bits).t().contiguous()
    return out


def read_linear(t: dict[str, torch.Tensor], spec: QuantSpec, name: str) -> QuantizedLinear:
    codes = unpack_weight(t[".weight_packed"], t[".weight_shape"], spec.bits, name)
    scale = t[".weight_scale"].float()
    if spec.sym:
        zero = torch.full_like(scale, float(2 ** (spec.bits - 1)))
    else:
        zero = unpack_codes(t[".weight_zero_point"].t().contiguous(), spec.bits, codes.shape[0]).t().float()
    return QuantizedLinear(codes, scale, zero, spec)


def quantization_config(spec: QuantSpec, ignore: tuple[str, ...] = ()) -> dict[str, Any]:
    """config.json's ``quantization_config``, built with the compressed-tensors package's own types
    (``ignore``: modules left in full precision besides lm_head, e.g. ``re:.*mlp\\.gate$``)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    weights = QuantizationArgs(num_bits=spec.bits, type="int", symmetric=spec.sym, dynamic=False, actorder=None,
                               strategy="group" if spec.group_size else "channel", group_size=spec.group_size or None)
    config = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                                format="pack-quantized", quantization_status="compressed", ignore=["lm_head", *ignore])
    return config.model_dump(mode="json")
