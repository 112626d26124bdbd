"""What the methods need to know about a decoder block: its linears, norms and attention shape.

Supported: Llama-family blocks (Llama, Mistral, Qwen2, Qwen3) as implemented by transformers:
pre-norm RMSNorm, q/k/v/o attention with rotary embeddings and optional grouped-query attention
(Qwen3: with an RMSNorm over each head of q and k), and a gated MLP (gate/up/down). Anything else
gets a clear error instead of a silently wrong result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# model types whose attention normalises each head of q and k (weights [head_dim]) after the projection
QK_NORM_MODEL_TYPES = ("qwen3",)

ATTN_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
ATTN_OUT = "self_attn.o_proj"
MLP_IN = ("mlp.gate_proj", "mlp.up_proj")
MLP_OUT = "mlp.down_proj"
LINEARS = (*ATTN_QKV, ATTN_OUT, *MLP_IN, MLP_OUT)
NORMS = ("input_layernorm", "post_attention_layernorm")
QK_NORMS = ("self_attn.q_norm", "self_attn.k_norm")


class UnsupportedArchitecture(ValueError):
    """The checkpoint's architecture is not one whose blocks we know how to transform."""


@dataclass(frozen=True)
class BlockArch:
    """Shapes of one decoder block, read from a transformers config."""

    model_type: str
    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    num_layers: int
    vocab_size: int = 0  # the LM head's width (the planner's OAC head); 0 when unknown
    qk_norm: bool = False  # q and k pass a per-head RMSNorm (QK_NORMS): LET's q/k pair is not exact

    @classmethod
    def from_config(cls, config: Any) -> BlockArch:
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = getattr(config, "architectures", None)
            raise UnsupportedArchitecture(
                f"unsupported architecture: model_type={model_type!r} (architectures={archs}); "
                f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        layer_types = set(getattr(config, "layer_types", None) or ())
        if len(layer_types) > 1:  # each block would need its own mask; the calibrator reuses block 0's
            raise UnsupportedArchitecture(
                f"unsupported architecture: model_type={model_type!r} mixes attention layer types "
                f"({', '.join(sorted(layer_types))}); only models whose layers all attend alike are supported"
            )
        n_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
        return cls(
            model_type=model_type,
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            n_heads=n_heads,
            n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
            head_dim=head_dim,
            num_layers=config.num_hidden_layers,
            vocab_size=getattr(config, "vocab_size", 0) or 0,
            qk_norm=model_type in QK_NORM_MODEL_TYPES,
        )

    @property
    def kv_groups(self) -> int:
        return self.n_heads // self.n_kv_heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """[out, in] of every linear in the block."""
        h, q, kv, i = self.hidden, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.intermediate
        return {
            "self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
            "self_attn.o_proj": (h, q), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i),
        }
