"""SignRound's learned rounding and clipping with OmniQuant's learnable equivalent transformation:
per-channel LET scales (trained by AdamW) move activation outliers into the weights while the
rounding offsets and clipping factors (signed gradient descent) fit the quantization grid to them.
No peer combines the two."""

from __future__ import annotations

from typing import Any

from lsiq.methods.base import register
from lsiq.methods.signround import SIGNROUND_DEFAULTS
from lsiq.methods.trained import TrainedMethod


class LWCLETRound(TrainedMethod):
    name = "lwc-let-round"
    components = frozenset({"lwc", "let", "rounding"})
    # One sample per step (at SignRound's 100 sample passes per block, twice its steps) and the
    # token-normalised loss, so the few massive-activation positions do not decide every step: both
    # measured better (BENCHMARKS.md, "Why SignRound beat LSI at W2"). It ends on the mean of the
    # last quarter of the steps' parameters, not on the step whose one-sample loss was lowest: lower
    # block losses on all the calibration samples (BENCHMARKS.md, "Which step's parameters to keep").
    defaults = {**SIGNROUND_DEFAULTS, "steps": 100, "batch_size": 1, "loss": "token", "keep_best": False,
                "average_tail": 0.25}
    saved_weights = {"fp32": 3.55, "bf16": 3.05}
    weight_traffic = {"fp32": (55.3, 79.2), "bf16": (58.3, 82.2)}

    def defaults_for(self, wbits: int, abits: int = 16) -> dict[str, Any]:
        # At 4 bits the rounding offsets learn at twice AutoRound's rate (2 / steps): lower block
        # losses on the calibration samples and every W4 cell below AutoRound (BENCHMARKS.md, "The
        # rounding offsets' learning rate at W4"); 2 and 3 bits keep 1 / steps, the rate their
        # figures were measured with.
        return {**self.defaults, "lr_round_steps": 2.0} if wbits >= 4 else self.defaults


register(LWCLETRound())
