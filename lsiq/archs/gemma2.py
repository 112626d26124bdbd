"""Gemma 2: four norms per block (pre- and post-norm around attention and around the MLP), each an
RMSNorm computing x_hat * (1 + w), hence norm_offset 1 (LET's fold: w' = (1 + w) / s - 1). The
pre-norms feed q/k/v (input_layernorm) and gate/up (pre_feedforward_layernorm); the post-norms act
on a sublayer's output and have no pair. Attention logits are soft-capped, which PyTorch's SDPA
cannot do: eager attention, in every process. Sliding-window and global layers alternate
(config.layer_types): each gets its own mask (lsiq.capture)."""

from lsiq.archs.base import SEPARATE_LINEARS, Family, register, standard_pairs

GEMMA2_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")

GEMMA2 = register(Family(
    name="gemma2",
    model_types=("gemma2",),
    linears=SEPARATE_LINEARS,
    norms=GEMMA2_NORMS,
    norm_offset=1.0,
    let_pairs=standard_pairs(attn_norm="input_layernorm", mlp_norm="pre_feedforward_layernorm"),
    attn_implementation="eager",
))
