"""Mixture-of-experts families: Mixtral, Qwen3-MoE, DeepSeek-V3 and gpt-oss.

Each routed expert's projections are quantized as 2-D linears (lsiq.expert_layout: transformers 5
holds them in fused 3-D parameters, the Hub and our output one linear per expert and role); the
router stays in full precision; DeepSeek-V3's shared experts are quantized like a dense MLP and
its leading dense layers are dense blocks. lsiq.moe calibrates such a block in two stages: its
attention on the attention half's output, then its MLP's experts on their own outputs over every
token (docs/methods.md, "Mixture-of-experts blocks").

LET pairs: the attention's, where exact (norm -> q/k/v, v -> o, and the rotary q/k pair without q/k
norms; gpt-oss's attention sinks are per-head logits that no pair touches). DeepSeek-V3's multi-head
latent attention has the three norm pairs that are exact: input_layernorm -> q_a_proj and
kv_a_proj_with_mqa, q_a_layernorm -> q_b_proj, kv_a_layernorm -> kv_b_proj (kv_b's value rows are
interleaved with its key rows per head, so v -> o is left out, as is a rotary pair: the rotary part
of k is shared by every head). The MoE MLP's norm feeds the router and every expert: no pair; each
expert's up -> down pair is exact (--let-down) where the MLP is act(gate) * up.
"""

from lsiq.archs.base import ATTN_INPUT, PRE_NORMS, SEPARATE_LINEARS, Experts, Family, Pair, register

ATTENTION = {k: v for k, v in SEPARATE_LINEARS.items() if k.startswith("self_attn.")}
DENSE_MLP = {k: v for k, v in SEPARATE_LINEARS.items() if k.startswith("mlp.")}
ATTENTION_PAIRS = (Pair("qkv", "norm", "input_layernorm", ATTN_INPUT), Pair("out", "heads", "v", ("o",)))
ROTARY_PAIR = Pair("qk", "rotary", "q", ("k",))
FUSED_EXPERTS = {"gate_up_proj": ("gate", "up"), "down_proj": ("down",)}

MIXTRAL = register(Family(
    name="mixtral", model_types=("mixtral",), linears=ATTENTION, norms=PRE_NORMS,
    let_pairs=(*ATTENTION_PAIRS, ROTARY_PAIR), keep_fp=("mlp.gate",),
    experts=Experts(module="mlp.experts", linears=FUSED_EXPERTS, router="mlp.gate", count="num_local_experts",
                    width="intermediate_size", names={"gate": "w1", "up": "w3", "down": "w2"},
                    renames=(("mlp.", "block_sparse_moe."),)),
))

QWEN3_MOE = register(Family(
    name="qwen3_moe", model_types=("qwen3_moe",), linears=ATTENTION, norms=PRE_NORMS,
    qk_norms=("self_attn.q_norm", "self_attn.k_norm"), let_pairs=ATTENTION_PAIRS, keep_fp=("mlp.gate",),
    experts=Experts(module="mlp.experts", linears=FUSED_EXPERTS, router="mlp.gate", count="num_experts",
                    width="moe_intermediate_size", dense=DENSE_MLP),
))

DEEPSEEK_V3 = register(Family(
    name="deepseek_v3", model_types=("deepseek_v3",),
    linears={"self_attn.q_a_proj": ("q_a",), "self_attn.q_b_proj": ("q_b",), "self_attn.kv_a_proj_with_mqa": ("kv_a",),
             "self_attn.kv_b_proj": ("kv_b",), "self_attn.o_proj": ("o",)},
    norms=(*PRE_NORMS, "self_attn.q_a_layernorm", "self_attn.kv_a_layernorm"),
    let_pairs=(Pair("qkv", "norm", "input_layernorm", ("q_a", "kv_a")),
               Pair("q_b", "norm", "self_attn.q_a_layernorm", ("q_b",)),
               Pair("kv_b", "norm", "self_attn.kv_a_layernorm", ("kv_b",))),
    keep_fp=("mlp.gate",),
    experts=Experts(module="mlp.experts", linears=FUSED_EXPERTS, router="mlp.gate", count="n_routed_experts",
                    width="moe_intermediate_size",
                    shared={"mlp.shared_experts.gate_proj": ("gate",), "mlp.shared_experts.up_proj": ("up",),
                            "mlp.shared_experts.down_proj": ("down",)},
                    shared_count="n_shared_experts", dense=DENSE_MLP),
))

GPT_OSS = register(Family(
    name="gpt_oss", model_types=("gpt_oss",), linears=ATTENTION, norms=PRE_NORMS,
    let_pairs=(*ATTENTION_PAIRS, ROTARY_PAIR), keep_fp=("mlp.router",), attn_implementation="eager",
    experts=Experts(module="mlp.experts", linears=FUSED_EXPERTS, router="mlp.router", count="num_local_experts",
                    width="intermediate_size", transposed=True, interleaved=True, down_pair=False, mlp_tuple=True),
    native_only=("transformers 5.25 has no loader for gpt-oss experts stored one linear per expert (no conversion "
                 "mapping for gpt_oss), and vLLM's gpt-oss loader reads fused bf16 or MXFP4 experts"),
))
