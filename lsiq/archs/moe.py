"""Mixture-of-experts families, described but refused until their calibration exists (the next
issue): the experts' layouts in transformers 5 (3-D fused tensors, not nn.Linears), the routers
kept in full precision, DeepSeek-V3's shared experts and dense leading layers. The attention parts
are those of the dense families; DeepSeek-V3's multi-head latent attention has linears of its own."""

from lsiq.archs.base import ATTN_INPUT, PRE_NORMS, SEPARATE_LINEARS, Experts, Family, Pair, register

REFUSED = ("mixture-of-experts blocks (routed experts in fused 3-D tensors, a router kept in full precision) are not "
           "calibrated yet; dense families: {}")
ATTENTION = {k: v for k, v in SEPARATE_LINEARS.items() if k.startswith("self_attn.")}
# the attention's pairs, exact as in the dense families (the MLP's wait for the experts' calibration)
ATTENTION_PAIRS = (Pair("qkv", "norm", "input_layernorm", ATTN_INPUT), Pair("out", "heads", "v", ("o",)))
FUSED_EXPERTS = {"gate_up_proj": ("gate", "up"), "down_proj": ("down",)}


def _refusal() -> str:
    return REFUSED.format("llama, mistral, qwen2, qwen3, gemma2, gemma3_text, phi3, olmo2")


MIXTRAL = register(Family(
    name="mixtral", model_types=("mixtral",), linears=ATTENTION, norms=PRE_NORMS,
    let_pairs=(*ATTENTION_PAIRS, Pair("qk", "rotary", "q", ("k",))), keep_fp=("mlp.gate",),
    experts=Experts(module="mlp.experts", layout="fused3d", linears=FUSED_EXPERTS, router="mlp.gate",
                    count="num_local_experts"),
    unsupported=_refusal(),
))

QWEN3_MOE = register(Family(
    name="qwen3_moe", model_types=("qwen3_moe",), linears=ATTENTION, norms=PRE_NORMS,
    qk_norms=("self_attn.q_norm", "self_attn.k_norm"), let_pairs=ATTENTION_PAIRS, keep_fp=("mlp.gate",),
    experts=Experts(module="mlp.experts", layout="fused3d", linears=FUSED_EXPERTS, router="mlp.gate",
                    count="num_experts"),
    unsupported=_refusal(),
))

DEEPSEEK_V3 = register(Family(
    name="deepseek_v3", model_types=("deepseek_v3",),
    linears={"self_attn.q_a_proj": ("q_a",), "self_attn.q_b_proj": ("q_b",), "self_attn.kv_a_proj_with_mqa": ("kv_a",),
             "self_attn.kv_b_proj": ("kv_b",), "self_attn.o_proj": ("o",)},
    norms=(*PRE_NORMS, "self_attn.q_a_layernorm", "self_attn.kv_a_layernorm"), let_pairs=(), keep_fp=("mlp.gate",),
    experts=Experts(module="mlp.experts", layout="fused3d", linears=FUSED_EXPERTS, router="mlp.gate",
                    count="n_routed_experts", shared={"mlp.shared_experts.gate_proj": ("gate",),
                                                      "mlp.shared_experts.up_proj": ("up",),
                                                      "mlp.shared_experts.down_proj": ("down",)},
                    dense_layers="first_k_dense_replace"),
    unsupported=_refusal() + " (DeepSeek-V3 also has multi-head latent attention)",
))

GPT_OSS = register(Family(
    name="gpt_oss", model_types=("gpt_oss",), linears=ATTENTION, norms=PRE_NORMS, let_pairs=(), keep_fp=("mlp.router",),
    experts=Experts(module="mlp.experts", layout="fused3d", linears=FUSED_EXPERTS, router="mlp.router",
                    count="num_local_experts", transposed=True, interleaved=True),
    unsupported=_refusal() + " (gpt-oss also has attention sinks)",
))
