"""Phi-3 and Phi-4 (model_type phi3): fused projections. ``qkv_proj`` stacks q, k and v rows (in
that order) and ``gate_up_proj`` stacks gate then up rows; LET's pairs act on those row ranges:
v -> o scales rows [q + k, q + 2k) of qkv_proj, the rotary pair rows [0, q) and [q, q + k), the
optional up -> down pair rows [I, 2I) of gate_up_proj. Phi-4-mini rotates only part of each head
(partial_rotary_factor): the q/k pair has one scale per rotary pair and one per channel beyond."""

from lsiq.archs.base import PRE_NORMS, Family, register, standard_pairs

PHI3 = register(Family(
    name="phi3",
    model_types=("phi3",),
    linears={"self_attn.qkv_proj": ("q", "k", "v"), "self_attn.o_proj": ("o",),
             "mlp.gate_up_proj": ("gate", "up"), "mlp.down_proj": ("down",)},
    norms=PRE_NORMS,
    let_pairs=standard_pairs(),
))
