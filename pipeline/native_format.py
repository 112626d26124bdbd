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
from lsiq.block import BlockResult, QuantizedLinear
from lsiq.packing import pack_codes, unpack_codes
from lsiq.quantizer import QuantSpec

NAME = "native"
FORMAT = "lsiq-native-v1"
SUFFIXES = (".qweight", ".scales", ".qzeros", ".weight_shape", ".lowrank_a", ".lowrank_b")


def check(spec: QuantSpec, abits: int, arch: BlockArch) -> None:
    """Every setting fits this layout."""


def block_tensors(prefix: str, result: BlockResult) -> dict[str, torch.Tensor]:
    """Flatten a calibrated block into named tensors under ``prefix`` (``model.layers.3.``)."""
    out: dict[str, torch.Tensor] = {}
    for name, q in result.linears.items():
        out[f"{prefix}{name}.qweight"] = pack_codes(q.codes.cpu(), q.spec.bits)
        out[f"{prefix}{name}.scales"] = q.scale.detach().to(torch.float32).cpu().contiguous()
        out[f"{prefix}{name}.qzeros"] = q.zero.detach().cpu().to(torch.uint8).contiguous()
        out[f"{prefix}{name}.weight_shape"] = torch.tensor(list(q.codes.shape), dtype=torch.int64)
        if q.lowrank_a is not None:  # the values are float16 already (lsiq.block.add_lowrank)
            out[f"{prefix}{name}.lowrank_a"] = q.lowrank_a.detach().cpu().to(torch.float16).contiguous()
            out[f"{prefix}{name}.lowrank_b"] = q.lowrank_b.detach().cpu().to(torch.float16).contiguous()
    for name, t in result.tensors.items():
        out[f"{prefix}{name}"] = t.detach().to(torch.float32).cpu().contiguous()
    return out


def read_linears(tensors: dict[str, torch.Tensor], spec: QuantSpec
                 ) -> tuple[dict[str, QuantizedLinear], dict[str, torch.Tensor]]:
    """The integer form of every stored linear (by module name), and the plain tensors."""
    plain = {k: v for k, v in tensors.items() if not k.endswith(SUFFIXES)}
    linears = {}
    for key in tensors:
        if key.endswith(".qweight"):
            base = key[: -len(".qweight")]
            out_f, in_f = (int(v) for v in tensors[f"{base}.weight_shape"])
            codes = unpack_codes(tensors[key], spec.bits, in_f)
            if codes.shape[0] != out_f:
                raise ValueError(f"{key}: {codes.shape[0]} rows, weight_shape says {out_f}")
            q = QuantizedLinear(codes, tensors[f"{base}.scales"], tensors[f"{base}.qzeros"].float(), spec)
            if f"{base}.lowrank_a" in tensors:
                q.lowrank_a, q.lowrank_b = tensors[f"{base}.lowrank_a"].float(), tensors[f"{base}.lowrank_b"].float()
            linears[base] = q
    return linears, plain


def quantization_config(spec: QuantSpec) -> None:
    """No ``quantization_config`` in config.json: only our evaluator reads this layout."""
    return None
