"""Our native quantized layout ("lsiq-native-v1"), one linear ``X`` (e.g.
``model.layers.0.self_attn.q_proj``) stored as:

- ``X.qweight``: int32 [out, ceil(in * bits / 32)], b-bit codes packed along the input dim
  (little-endian bitstream, see lsiq.packing);
- ``X.scales``: float32 [out, in / group_size] (one column when per channel);
- ``X.qzeros``: uint8 [out, in / group_size], the zero points as unsigned codes;
- ``X.weight_shape``: int64 [2] = [out, in];
- with ``--lowrank``: ``X.lowrank_a`` float16 [out, r] and ``X.lowrank_b`` float16 [r, in].
A weight is ``(code - zero) * scale`` (+ ``lowrank_a @ lowrank_b``). Every other tensor (LET-folded norms, biases, embeddings,
final norm, head) is stored as a plain float32 tensor under its transformers name. The settings,
including weight-activation ones (``abits``), are in ``lsiq_manifest.json``: this is the one
format that holds them, and the one that holds low-rank corrections.
"""

from __future__ import annotations

import torch

from lsiq.arch import BlockArch
from lsiq.packing import pack_codes, unpack_codes
from lsiq.quantizer import QuantSpec
from lsiq.results import QuantizedLinear

NAME = "native"
FORMAT = "lsiq-native-v1"
# how a user loads the output (OUT: its path), for the last lines of a run
LOAD = "python -m pipeline.evaluate --model OUT --text FILE, or pipeline.model_io.load_quantized(OUT) in Python"
SUFFIXES = (".qweight", ".scales", ".qzeros", ".weight_shape", ".lowrank_a", ".lowrank_b")


def check(spec: QuantSpec, abits: int, arch: BlockArch) -> None:
    """Every setting fits this layout."""


MARKER = ".qweight"  # the tensor whose name marks a stored linear


def linear_tensors(q: QuantizedLinear) -> dict[str, torch.Tensor]:
    """One linear's stored tensors, by suffix."""
    out = {".qweight": pack_codes(q.codes, q.spec.bits).cpu(),
           ".scales": q.scale.detach().to(torch.float32).cpu().contiguous(),
           ".qzeros": q.zero.detach().cpu().to(torch.uint8).contiguous(),
           ".weight_shape": torch.tensor(list(q.codes.shape), dtype=torch.int64)}
    if q.lowrank_a is not None:  # the values are float16 already (lsiq.lowrank.add_lowrank)
        out[".lowrank_a"] = q.lowrank_a.detach().cpu().to(torch.float16).contiguous()
        out[".lowrank_b"] = q.lowrank_b.detach().cpu().to(torch.float16).contiguous()
    return out


def unpack_weight(packed: torch.Tensor, weight_shape: torch.Tensor, bits: int, name: str) -> torch.Tensor:
    """Codes [out, in] of a weight packed along its input dim, checked against ``weight_shape``."""
    out_f, in_f = (int(v) for v in weight_shape)
    try:
        codes = unpack_codes(packed, bits, in_f)
    except ValueError as e:  # words that do not match weight_shape's width
        raise ValueError(f"{name}: {e} (weight_shape says {out_f} x {in_f})") from None
    if codes.shape[0] != out_f:
        raise ValueError(f"{name}: {codes.shape[0]} rows, weight_shape says {out_f}")
    return codes


def read_linear(t: dict[str, torch.Tensor], spec: QuantSpec, name: str) -> QuantizedLinear:
    """The integer form of one stored linear from its tensors ``t`` (by suffix)."""
    codes = unpack_weight(t[".qweight"], t[".weight_shape"], spec.bits, name)
    q = QuantizedLinear(codes, t[".scales"], t[".qzeros"].float(), spec)
    if ".lowrank_a" in t:
        q.lowrank_a, q.lowrank_b = t[".lowrank_a"].float(), t[".lowrank_b"].float()
    return q


def quantization_config(spec: QuantSpec) -> None:
    """No ``quantization_config`` in config.json: only our evaluator reads this layout."""
    return None
