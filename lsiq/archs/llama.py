"""Llama-style blocks (Llama 2/3.x, Mistral, Qwen2/2.5): pre-norm RMSNorm, separate q/k/v/o with
rotary embeddings and grouped-query attention (Qwen2: with q/k/v biases, which LET's row scales
carry), a gated MLP. Every standard LET pair is exact. Mistral's and Qwen2's sliding windows are
per-layer inputs (lsiq.capture), not part of the block."""

from lsiq.archs.base import PRE_NORMS, SEPARATE_LINEARS, Family, register, standard_pairs

LLAMA = register(Family(
    name="llama",
    model_types=("llama", "mistral", "qwen2"),
    linears=SEPARATE_LINEARS,
    norms=PRE_NORMS,
    let_pairs=standard_pairs(),
))
