"""LET, OmniQuant's learnable equivalent transformation, on whatever pairs a block's descriptor has.

Per-channel scales move between an activation and the linears that read it, leaving the FP block
output unchanged: ``Y = (X / s) (s * W)^T``. The pairs are data (lsiq.archs: ``arch.let_pairs``),
applied in their order; those of a Llama block are
- qkv: input_layernorm weight / s, q/k/v input columns * s (s over hidden channels);
- fc1: post_attention_layernorm weight / s, gate/up input columns * s;
- out: v output rows / s, o input columns * s, where s lives on the KV heads' channels and is
  repeated for every query head sharing that KV head (GQA: query head h reads KV head h // groups);
- qk: q output rows / s, k output rows * s, with s shared by each rotary pair (d, d + head_dim/2)
  so the scaling commutes with RoPE, and repeated over the query heads of a KV group; left out
  where q and k pass a norm after the projection (Qwen3, Gemma 3, OLMo 2), which would undo it;
- down (optional, AWQ's up -> down pair): up output rows / s, down input columns * s, exact
  because the gated MLP's product act(gate(x)) * up(x) is linear in up's output.
Other families change the details, not the code: Gemma's norms compute x * (1 + w) (the fold is
w' = (1 + w) / s - 1), Phi-3's fused qkv_proj and gate_up_proj take their scales on row ranges,
OLMo 2's post-norms feed no linear (no norm pair). The shift of the paper's ``(X - d) / s`` is not
used: RMSNorm has no bias to absorb it (the reference code also disables it for Llama and for
weight-only runs).
"""

from __future__ import annotations

import torch
from torch import nn

from lsiq.archs.base import SCALE_MIN, BlockArch


def smooth_scale(act_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant initialisation s = act^alpha / w^(1 - alpha), as OmniQuant initialises LET."""
    return (act_absmax.clamp(min=SCALE_MIN).pow(alpha) / w_absmax.clamp(min=SCALE_MIN).pow(1 - alpha)).clamp(min=SCALE_MIN)


class LET(nn.Module):
    """The learnable scales of one block: one parameter per pair of ``arch.let_pairs`` (the
    optional ones, such as up -> down, only with ``down``), named after the pair."""

    def __init__(self, arch: BlockArch, init: dict[str, torch.Tensor] | None = None, down: bool = False) -> None:
        super().__init__()
        self.arch = arch
        self.pairs = tuple(p for p in arch.let_pairs if down or not p.optional)
        init = init or {}
        for pair in self.pairs:
            value = init.get(pair.name, torch.ones(pair.shape))
            if tuple(value.shape) != pair.shape:
                raise ValueError(f"LET {pair.name} scale init has shape {tuple(value.shape)}, expected {pair.shape}")
            self.register_parameter(pair.name, nn.Parameter(value.detach().clone().float()))

    def transform(self, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Return a copy of the block tensors ``t`` (names relative to the block) transformed.
        Tensors absent from ``t`` are skipped, so one linear can be transformed on its own."""
        t = dict(t)
        for pair in self.pairs:
            pair.apply(t, getattr(self, pair.name).clamp(min=SCALE_MIN))
        return t
