"""OLMo 2: post-norms only (each RMSNorm acts on a sublayer's output before the residual add), so
no norm feeds a linear and there is no norm -> linears pair; q and k pass an RMSNorm over the whole
projection (all heads at once), which rules the rotary pair out. v -> o and up -> down stay exact."""

from lsiq.archs.base import SEPARATE_LINEARS, Family, register, standard_pairs

OLMO2 = register(Family(
    name="olmo2",
    model_types=("olmo2",),
    linears=SEPARATE_LINEARS,
    norms=("post_attention_layernorm", "post_feedforward_layernorm"),
    qk_norms=("self_attn.q_norm", "self_attn.k_norm"),
    let_pairs=standard_pairs(attn_norm=None, mlp_norm=None, rotary=False),
))
