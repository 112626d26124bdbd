"""SignRound's learned rounding and clipping with OmniQuant's learnable equivalent transformation:
per-channel LET scales and shifts (trained by AdamW) move activation outliers into the weights
while the rounding offsets and clipping factors (signed gradient descent, best step kept) fit the
quantization grid to them. No peer combines the two."""

from __future__ import annotations

from lsiq.methods.base import register
from lsiq.methods.signround import SIGNROUND_DEFAULTS
from lsiq.methods.trained import TrainedMethod


class LWCLETRound(TrainedMethod):
    name = "lwc-let-round"
    components = frozenset({"lwc", "let", "rounding"})
    # One sample per step (at SignRound's 100 sample passes per block, twice its steps) and the
    # token-normalised loss, so the few massive-activation positions do not decide every step: both
    # measured better (BENCHMARKS.md, "Why SignRound beat LSI at W2").
    defaults = {**SIGNROUND_DEFAULTS, "steps": 100, "batch_size": 1, "loss": "token"}
    saved_weights = {"fp32": 5.0, "bf16": 4.5}
    weight_traffic = {"fp32": (60.2, 77.6), "bf16": (63.2, 80.6)}


register(LWCLETRound())
