"""The output formats, chosen by ``--format``. Each module describes one linear's stored tensors
(``linear_tensors``, ``read_linear``, by suffix, found by its ``MARKER`` suffix) and gives config.json
its ``quantization_config``; the block-level work is here, once (:func:`block_tensors`,
:func:`read_linears`): every other tensor (LET-folded norms, biases) is stored as plain float32. The
pipeline propagates to the next block exactly the weights a format stores, so a resumed run (which
replays from the files) matches an uninterrupted one.
"""

from __future__ import annotations

import re
import types

import torch

from lsiq.arch import BlockArch
from lsiq.quantizer import QuantSpec
from lsiq.results import BlockResult, QuantizedLinear
from pipeline import ct_format, gptq_format, native_format

MODULES: dict[str, types.ModuleType] = {m.NAME: m for m in (ct_format, gptq_format, native_format)}
FORMATS = tuple(MODULES)


def default_format(wbits: int, abits: int, lowrank: bool = False, sym: bool = False) -> str:
    """The layout a plain ``AutoModelForCausalLM.from_pretrained(out)`` loads and vLLM serves:
    compressed-tensors for symmetric 4/8-bit grids, GPTQ v1 for asymmetric ones and for 2/3 bits
    (transformers' compressed-tensors loader refuses packed asymmetric zero points); native for what
    neither holds (weight-activation settings, low-rank corrections, 5-7 bits)."""
    if abits < 16 or lowrank:
        return native_format.NAME
    if sym and wbits in ct_format.BITS:
        return ct_format.NAME
    if wbits in gptq_format.BITS:  # every bit width compressed-tensors holds, too
        return gptq_format.NAME
    return native_format.NAME


def get(name: str) -> types.ModuleType:
    if name not in MODULES:
        raise ValueError(f"unknown format {name!r}; choose one of {', '.join(FORMATS)}")
    return MODULES[name]


def by_id(format_id: str) -> types.ModuleType:
    """The module of a manifest's ``format`` value."""
    for m in MODULES.values():
        if m.FORMAT == format_id:
            return m
    raise ValueError(f"unknown format {format_id!r} in the manifest")


def zero_min(name: str, spec: QuantSpec) -> int:
    """The smallest zero point the format can store (calibration must respect it)."""
    return gptq_format.zero_min(spec) if name == gptq_format.NAME else 0


def check(name: str, spec: QuantSpec, abits: int, arch: BlockArch, lowrank: bool = False) -> None:
    """Raise ValueError naming the problem when ``name`` cannot hold these settings for this model
    (every kind of layer it has: DeepSeek's dense and mixture-of-experts ones)."""
    if lowrank and name != native_format.NAME:
        raise ValueError(f"--format {name} cannot hold low-rank corrections (--lowrank): use --format native")
    reason = native_only(arch)
    if reason and name != native_format.NAME:
        raise ValueError(f"--format {name} cannot hold {arch.name} models: {reason}; use --format native")
    for layer_arch, _count in arch.kinds():
        get(name).check(spec, abits, layer_arch)


def native_only(arch: BlockArch) -> str:
    """Why only the native format can hold this model's output ('' when the others can)."""
    return arch.family.native_only if arch.family is not None else ""


def quantization_config(name: str, spec: QuantSpec, arch: BlockArch | None = None) -> dict | None:
    """config.json's ``quantization_config`` of format ``name``; compressed-tensors' ignores a
    mixture-of-experts model's routers as well as the head (llm-compressor's convention)."""
    fmt = get(name)
    if fmt is ct_format and arch is not None and arch.family is not None and arch.family.experts is not None:
        router = arch.family.experts.router
        names = "|".join(re.escape(n) for n in dict.fromkeys((router, arch.checkpoint_name(router))))
        return ct_format.quantization_config(spec, ignore=(f"re:.*({names})$",))
    return fmt.quantization_config(spec)


def block_tensors(name: str, prefix: str, result: BlockResult) -> dict[str, torch.Tensor]:
    """A calibrated block as format ``name``'s named tensors under ``prefix`` (``model.layers.3.``)."""
    fmt = get(name)
    out: dict[str, torch.Tensor] = {}
    for linear, q in result.linears.items():
        if q.lowrank_a is not None and fmt is not native_format:
            raise ValueError(f"{name} cannot hold low-rank corrections: use --format native")
        try:
            parts = fmt.linear_tensors(q)
        except ValueError as e:
            raise ValueError(f"{prefix}{linear}: {e}") from None
        out.update({f"{prefix}{linear}{suffix}": t for suffix, t in parts.items()})
    for key, t in result.tensors.items():
        out[f"{prefix}{key}"] = t.detach().to(torch.float32).cpu().contiguous()
    return out


def read_linears(name: str, tensors: dict[str, torch.Tensor], spec: QuantSpec
                 ) -> tuple[dict[str, QuantizedLinear], dict[str, torch.Tensor]]:
    """The integer form of every linear stored in format ``name`` (by module name), and the plain tensors."""
    fmt = get(name)
    plain = {k: v for k, v in tensors.items() if not k.endswith(fmt.SUFFIXES)}
    linears = {}
    for key in tensors:
        if key.endswith(fmt.MARKER):
            base = key[: -len(fmt.MARKER)]
            parts = {s: tensors[base + s] for s in fmt.SUFFIXES if base + s in tensors}
            linears[base] = fmt.read_linear(parts, spec, base)
    return linears, plain


def dequantize_tensors(name: str, tensors: dict[str, torch.Tensor], spec: QuantSpec) -> dict[str, torch.Tensor]:
    """Stored tensors of format ``name`` as a plain float32 state dict (``X.weight`` per linear)."""
    linears, plain = read_linears(name, tensors, spec)
    return plain | {f"{base}.weight": q.weight() for base, q in linears.items()}
