"""GPTQ v1 (AutoGPTQ's layout, read by vLLM's gptq/gptq_marlin and by transformers through
gptqmodel). One linear ``X`` is stored as (GPTQ v1's layout):

- ``X.qweight``: int32 [in * b / 32, out]: codes packed along the *input* dim, a little-endian
  bitstream per output column (for 3 bits, 32 codes fill 3 words and codes 10 and 21 straddle two);
- ``X.qzeros``: int32 [groups, out * b / 32]: ``zero - 1`` packed along the output dim (the v1
  convention that loaders undo by adding 1);
- ``X.scales``: float16 [groups, out];
- ``X.g_idx``: int32 [in], the group of each input column (``i // group_size``; no act-order).
A weight is ``(code - zero) * scale``. Asymmetric grids are calibrated with ``zero >= 1``
(QuantSpec.zero_min) because ``zero - 1`` must fit in b bits. The scales are float16 here, so the
stored weights differ from the float32 calibration result by that rounding; the pipeline propagates
the stored weights to the next block.
"""

from __future__ import annotations

from typing import Any

import torch

from lsiq.arch import BlockArch
from lsiq.packing import pack_codes, unpack_codes
from lsiq.quantizer import QuantSpec
from lsiq.results import QuantizedLinear

NAME = "gptq"
FORMAT = "gptq-v1"
# how a user loads the output (OUT: its path), for the last lines of a run
LOAD = "AutoModelForCausalLM.from_pretrained(OUT) (transformers with gptqmodel), or vllm serve OUT"
BITS = (2, 3, 4, 8)
SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx")


def zero_min(spec: QuantSpec) -> int:
    """The smallest zero point this layout can store for ``spec``."""
    return 0 if spec.sym else 1


def check(spec: QuantSpec, abits: int, arch: BlockArch) -> None:
    if spec.bits not in BITS:
        raise ValueError(f"--format gptq holds 2, 3, 4 and 8-bit weights, not {spec.bits}-bit: use --format native")
    if abits < 16:
        raise ValueError(f"--format gptq stores weight-only runs; W{spec.bits}A{abits} needs --format native "
                         "(the one format that keeps activation settings)")
    if spec.zero_min < zero_min(spec):
        raise ValueError("GPTQ v1 stores zero - 1: asymmetric runs for it need zero_min >= 1")
    for name, (out_f, in_f) in arch.linear_shapes().items():
        for what, n in (("in", in_f), ("out", out_f)):
            if n * spec.bits % 32:
                raise ValueError(f"{name}: {what}_features={n} times {spec.bits} bits is not a whole number of "
                                 "32-bit words, which GPTQ's packing needs; use --format native")


MARKER = ".qweight"


def linear_tensors(q: QuantizedLinear) -> dict[str, torch.Tensor]:
    bits = q.spec.bits
    in_f = q.codes.shape[1]
    zero = q.zero.detach().cpu()
    if bool((zero < 1).any()):
        raise ValueError("a zero point of 0 cannot be stored in GPTQ v1 (it stores zero - 1); calibrate with zero_min=1")
    return {".qweight": pack_codes(q.codes, bits).cpu().t().contiguous(),
            ".qzeros": pack_codes((zero - 1).to(torch.uint8).t().contiguous(), bits),
            ".scales": q.scale.detach().cpu().t().to(torch.float16).contiguous(),
            ".g_idx": (torch.arange(in_f) // q.spec.group_len(in_f)).to(torch.int32)}


def read_linear(t: dict[str, torch.Tensor], spec: QuantSpec, name: str) -> QuantizedLinear:
    g_idx = t[".g_idx"].long()
    in_f, out_f = g_idx.numel(), t[".qweight"].shape[1]
    if not torch.equal(g_idx, torch.arange(in_f, device=g_idx.device) // spec.group_len(in_f)):
        raise ValueError(f"{name}.g_idx is not in column order (act-order checkpoints are not read here)")
    codes = unpack_codes(t[".qweight"].t().contiguous(), spec.bits, in_f)
    zero = unpack_codes(t[".qzeros"], spec.bits, out_f).t().float() + 1
    scale = t[".scales"].t().float().contiguous()
    return QuantizedLinear(codes, scale, zero, spec)


def quantization_config(spec: QuantSpec) -> dict[str, Any]:
    """config.json's ``quantization_config`` (also written alone as quantize_config.json)."""
    return {"quant_method": "gptq", "bits": spec.bits, "group_size": spec.group_size or -1, "desc_act": False,
            "sym": spec.sym, "static_groups": False, "true_sequential": True, "lm_head": False,
            "checkpoint_format": "gptq"}
