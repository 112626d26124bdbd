"""LET, OmniQuant's learnable equivalent transformation, for Llama-family blocks with GQA.

Per-channel scales move between an activation and the linears that read it, leaving the FP block
output unchanged: ``Y = (X / s) (s * W)^T``.
- qkv: input_layernorm weight / s, q/k/v input columns * s (s over hidden channels);
- fc1: post_attention_layernorm weight / s, gate/up input columns * s;
- out: v output rows / s, o input columns * s, where s lives on the KV heads' channels and is
  repeated for every query head sharing that KV head (GQA: query head h reads KV head h // groups);
- qk: q output rows / s, k output rows * s, with s shared by each rotary pair (d, d + head_dim/2)
  so the scaling commutes with RoPE, and repeated over the query heads of a KV group; left out
  where q and k pass a per-head norm (Qwen3's q_norm, k_norm), which would undo the scales;
- down (optional, AWQ's up -> down pair): up output rows / s, down input columns * s, exact
  because the gated MLP's product act(gate(x)) * up(x) is linear in up's output.
The shift of the paper's ``(X - d) / s`` is not used: RMSNorm has no bias to absorb it (the
reference code also disables it for Llama and for weight-only runs).
"""

from __future__ import annotations

import torch
from torch import nn

from lsiq.arch import ATTN_QKV, MLP_IN, BlockArch

SCALE_MIN = 1e-5


def smooth_scale(act_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant initialisation s = act^alpha / w^(1 - alpha), as OmniQuant initialises LET."""
    return (act_absmax.clamp(min=SCALE_MIN).pow(alpha) / w_absmax.clamp(min=SCALE_MIN).pow(1 - alpha)).clamp(min=SCALE_MIN)


class LET(nn.Module):
    """The learnable scales of one block."""

    def __init__(self, arch: BlockArch, init: dict[str, torch.Tensor] | None = None, down: bool = False) -> None:
        super().__init__()
        self.arch = arch
        shapes = {
            "qkv": (arch.hidden,),
            "fc1": (arch.hidden,),
            "out": (arch.n_kv_heads * arch.head_dim,),
        }
        if not arch.qk_norm:  # a per-head norm on q and k would undo the pair's scales
            shapes["qk"] = (arch.n_kv_heads, arch.head_dim // 2)
        if down:
            shapes["down"] = (arch.intermediate,)
        init = init or {}
        for name, shape in shapes.items():
            value = init.get(name, torch.ones(shape))
            if tuple(value.shape) != shape:
                raise ValueError(f"LET {name} scale init has shape {tuple(value.shape)}, expected {shape}")
            self.register_parameter(name, nn.Parameter(value.detach().clone().float()))

    def _expand_heads(self, s: torch.Tensor) -> torch.Tensor:
        """[kv_heads, head_dim] -> [n_heads * head_dim], query head h taking KV head h // groups."""
        return s.repeat_interleave(self.arch.kv_groups, dim=0).reshape(-1)

    def transform(self, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Return a copy of the block tensors ``t`` (names relative to the block) transformed.
        Tensors absent from ``t`` are skipped, so one linear can be transformed on its own."""
        t = dict(t)
        s = self.qkv.clamp(min=SCALE_MIN)
        _scale(t, "input_layernorm.weight", s, divide=True)
        for name in ATTN_QKV:
            _scale(t, f"{name}.weight", s)
        s = self.fc1.clamp(min=SCALE_MIN)
        _scale(t, "post_attention_layernorm.weight", s, divide=True)
        for name in MLP_IN:
            _scale(t, f"{name}.weight", s)
        s = self.out.clamp(min=SCALE_MIN)
        _scale_rows(t, "self_attn.v_proj", 1 / s)
        _scale(t, "self_attn.o_proj.weight", self._expand_heads(s.view(self.arch.n_kv_heads, -1)))
        if hasattr(self, "qk"):
            s = self.qk.clamp(min=SCALE_MIN)
            s_kv = torch.cat([s, s], dim=-1)  # rotary pairs (d, d + head_dim/2) share a scale
            _scale_rows(t, "self_attn.k_proj", s_kv.reshape(-1))
            _scale_rows(t, "self_attn.q_proj", 1 / self._expand_heads(s_kv))
        if hasattr(self, "down"):
            s = self.down.clamp(min=SCALE_MIN)
            _scale_rows(t, "mlp.up_proj", 1 / s)
            _scale(t, "mlp.down_proj.weight", s)
        return t


def _scale(t: dict[str, torch.Tensor], key: str, s: torch.Tensor, divide: bool = False) -> None:
    if key in t:
        t[key] = t[key] / s if divide else t[key] * s


def _scale_rows(t: dict[str, torch.Tensor], linear: str, s: torch.Tensor) -> None:
    _scale(t, f"{linear}.weight", s[:, None])
    _scale(t, f"{linear}.bias", s)
