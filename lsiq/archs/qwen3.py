"""Qwen3: a Llama-style block whose attention normalises each head of q and k (RMSNorm over
head_dim) after the projection. That norm would undo the rotary q/k pair's scales, so the pair is
left out; the other pairs are exact and q_norm / k_norm are carried unchanged."""

from lsiq.archs.base import PRE_NORMS, SEPARATE_LINEARS, Family, register, standard_pairs

QWEN3 = register(Family(
    name="qwen3",
    model_types=("qwen3",),
    linears=SEPARATE_LINEARS,
    norms=PRE_NORMS,
    qk_norms=("self_attn.q_norm", "self_attn.k_norm"),
    let_pairs=standard_pairs(rotary=False),
))
