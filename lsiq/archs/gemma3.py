"""Gemma 3 (text, model_type gemma3_text): Gemma 2's four (1 + w) norms plus a per-head RMSNorm on
q and k (q_norm, k_norm, also (1 + w)), which leaves the rotary q/k pair out as for Qwen3. Sliding
and global layers have their own masks and their own rotary embeddings (local and global RoPE
bases), both per-layer inputs (lsiq.capture). No logit soft-capping: SDPA.

The multimodal checkpoints (model_type gemma3: a vision tower beside the language model, whose
blocks live under model.language_model) are refused; pipeline.plan plans their language model."""

from lsiq.archs.base import SEPARATE_LINEARS, Family, register, standard_pairs
from lsiq.archs.gemma2 import GEMMA2_NORMS

GEMMA3 = register(Family(
    name="gemma3",
    model_types=("gemma3_text",),
    linears=SEPARATE_LINEARS,
    norms=GEMMA2_NORMS,
    qk_norms=("self_attn.q_norm", "self_attn.k_norm"),
    norm_offset=1.0,
    let_pairs=standard_pairs(attn_norm="input_layernorm", mlp_norm="pre_feedforward_layernorm", rotary=False),
))

register(Family(
    name="gemma3-multimodal",
    model_types=("gemma3",),
    linears=SEPARATE_LINEARS,
    norms=GEMMA2_NORMS,
    let_pairs=(),
    unsupported="a multimodal checkpoint (vision tower + language model under model.language_model); quantize its "
                "text-only form (model_type gemma3_text); pipeline.plan plans its language model from this config",
))
