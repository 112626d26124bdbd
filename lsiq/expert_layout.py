"""Where a mixture-of-experts block keeps its routed experts' weights, and the names of each layout.

transformers 5 holds a block's experts as fused 3-D parameters (``mlp.experts.gate_up_proj``
[experts, 2 I, H] and ``mlp.experts.down_proj`` [experts, H, I]; gpt-oss's transposed, [experts,
in, out], with gate and up rows interleaved and a bias per expert), while the Hub's checkpoints,
vLLM and the output formats name one 2-D linear per expert and role
(``mlp.experts.3.gate_proj.weight``; Mixtral's ``block_sparse_moe.experts.3.w1.weight``). The
methods quantize each expert's projection as a 2-D linear under that per-expert name. This module
converts between the layouts for one block (names relative to it), given the family's
:class:`lsiq.archs.base.Experts` descriptor:

- :func:`expert_linears`: the per-expert linears (checkpoint names) and the role each plays;
- :func:`split` / :func:`fuse`: the module's fused parameters <-> per-expert 2-D weights (and biases);
- :func:`to_module`: a block's tensors under checkpoint names (either layout, the Hub's prefixes or
  the module's) -> the module's own state dict;
- :func:`checkpoint_name`: a module tensor's name as checkpoints write it (Mixtral's ``mlp.`` ->
  ``block_sparse_moe.``).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lsiq.archs.base import Experts


def checkpoint_name(ex: Experts, name: str) -> str:
    """``name`` (relative to the block, the module's naming) as the family's checkpoints write it."""
    for module_prefix, ckpt_prefix in ex.renames:
        if name.startswith(module_prefix):
            return ckpt_prefix + name[len(module_prefix):]
    return name


def module_name(ex: Experts, name: str) -> str:
    """A checkpoint name (either prefix) as the module names it (the inverse of :func:`checkpoint_name`)."""
    for module_prefix, ckpt_prefix in ex.renames:
        if name.startswith(ckpt_prefix):
            return module_prefix + name[len(ckpt_prefix):]
    return name


def expert_prefix(ex: Experts) -> str:
    """The per-expert linears' common prefix in checkpoints: ``mlp.experts.`` (Mixtral: ``block_sparse_moe.experts.``)."""
    return checkpoint_name(ex, ex.module) + "."


def roles(ex: Experts) -> tuple[str, ...]:
    """Each expert's roles in forward order (gate, up, down)."""
    return tuple(r for rs in ex.linears.values() for r in rs)


def expert_linears(ex: Experts, n_experts: int, experts: list[int] | range | None = None) -> dict[str, tuple[int, str]]:
    """Per-expert linear name (checkpoint naming, relative to the block) -> (expert, role), expert by
    expert, roles in forward order."""
    prefix = expert_prefix(ex)
    return {f"{prefix}{e}.{ex.names[r]}": (e, r) for e in (experts if experts is not None else range(n_experts))
            for r in roles(ex)}


def _rows(ex: Experts, param: str, w: torch.Tensor) -> list[torch.Tensor]:
    """One expert's [out, in] weight (or [out] bias) of fused ``param`` split into its roles' rows."""
    rs = ex.linears[param]
    if len(rs) == 1:
        return [w]
    if ex.interleaved:  # gate and up rows alternate (gpt-oss)
        return [w[i::len(rs)] for i in range(len(rs))]
    return list(w.chunk(len(rs), dim=0))


def split(ex: Experts, fused: dict[str, torch.Tensor], experts: list[int] | range | None = None
          ) -> dict[str, torch.Tensor]:
    """The per-expert 2-D weights (``{name}.weight``) and biases (``{name}.bias``, gpt-oss) of the
    experts' fused parameters ``fused`` (module names relative to the block: ``mlp.experts.gate_up_proj``);
    views where the layout allows (the caller copies what it changes)."""
    prefix = expert_prefix(ex)
    out: dict[str, torch.Tensor] = {}
    n = fused[f"{ex.module}.{next(iter(ex.linears))}"].shape[0]
    for e in experts if experts is not None else range(n):
        for param, rs in ex.linears.items():
            w = fused[f"{ex.module}.{param}"][e]
            w = w.T if ex.transposed else w
            for r, part in zip(rs, _rows(ex, param, w), strict=True):
                out[f"{prefix}{e}.{ex.names[r]}.weight"] = part
            bias = fused.get(f"{ex.module}.{param}_bias")
            if bias is not None:
                for r, part in zip(rs, _rows(ex, param, bias[e]), strict=True):
                    out[f"{prefix}{e}.{ex.names[r]}.bias"] = part
    return out


def fused_one(ex: Experts, param: str, parts: list[torch.Tensor]) -> torch.Tensor:
    """One expert's slice of fused ``param`` ([out, in], or [in, out] when transposed; [out] for a
    bias) from its roles' weights (or biases) in role order: the inverse of the split."""
    if len(parts) == 1:
        w = parts[0]
    elif ex.interleaved:
        w = torch.stack(parts, dim=1).reshape(-1, *parts[0].shape[1:])
    else:
        w = torch.cat(parts, dim=0)
    return w.T if ex.transposed and w.dim() == 2 else w


def fuse(ex: Experts, per_expert: dict[str, torch.Tensor], n_experts: int) -> dict[str, torch.Tensor]:
    """The module's fused parameters (and gpt-oss's fused biases) from every expert's per-expert tensors."""
    prefix = expert_prefix(ex)
    out = {}
    for param, rs in ex.linears.items():
        for kind, suffix in (("weight", ""), ("bias", "_bias")):
            first = f"{prefix}0.{ex.names[rs[0]]}.{kind}"
            if first not in per_expert:
                continue
            out[f"{ex.module}.{param}{suffix}"] = torch.stack(
                [fused_one(ex, param, [per_expert[f"{prefix}{e}.{ex.names[r]}.{kind}"] for r in rs])
                 for e in range(n_experts)])
    return out


def _per_expert_pattern(ex: Experts) -> re.Pattern[str]:
    names = "|".join(re.escape(n) for n in ex.names.values())
    prefixes = "|".join(re.escape(p) for p in {ex.module + ".", expert_prefix(ex)})
    return re.compile(rf"^(?:{prefixes})(\d+)\.({names})\.(weight|bias)$")


def is_per_expert(ex: Experts, name: str) -> bool:
    """``name`` is one expert's 2-D linear weight or bias, under either prefix."""
    return _per_expert_pattern(ex).match(name) is not None


def to_module(ex: Experts, tensors: dict[str, torch.Tensor], n_experts: int) -> dict[str, torch.Tensor]:
    """A block's tensors (relative names) as the module holds them: checkpoint prefixes renamed, per-expert
    2-D linears (either prefix) stacked into the fused parameters; the fused layout passes through."""
    pattern = _per_expert_pattern(ex)
    out, per = {}, {}
    prefix = expert_prefix(ex)
    for name, t in tensors.items():
        m = pattern.match(name)
        if m:
            per[f"{prefix}{m.group(1)}.{m.group(2)}.{m.group(3)}"] = t
        else:
            out[module_name(ex, name)] = t
    if per:
        out.update(fuse(ex, per, n_experts))
    return out


def checkpoint_layouts(ex: Experts, name: str, shape: tuple[int, ...], n_experts: int) -> list[dict[str, tuple[int, ...]]]:
    """The ways a checkpoint may hold the module's tensor ``name`` of ``shape``, each a set of
    checkpoint names and shapes: for the experts' fused parameters (and biases) one tensor per
    expert and role (the Hub's layout, first) or the fused tensor; under the checkpoint's prefix or
    the module's (transformers reads both)."""
    alts: list[dict[str, tuple[int, ...]]] = []
    for param, rs in ex.linears.items():
        for kind, suffix in (("weight", ""), ("bias", "_bias")):
            if name != f"{ex.module}.{param}{suffix}":
                continue
            if kind == "weight":
                out_total, width = (shape[2], shape[1]) if ex.transposed else (shape[1], shape[2])
                per = (out_total // len(rs), width)
            else:
                per = (shape[1] // len(rs),)
            for prefix in dict.fromkeys((expert_prefix(ex), ex.module + ".")):
                alts.append({f"{prefix}{e}.{ex.names[r]}.{kind}": per for e in range(n_experts) for r in rs})
    alts += [{n: shape} for n in dict.fromkeys((checkpoint_name(ex, name), name))]
    return alts
