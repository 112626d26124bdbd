"""SignRound (AutoRound's method) in this framework: learned rounding offsets (lsiq.rounding) and
min/max clipping factors in [0, 1] from the round-to-nearest grid, trained by signed gradient
descent with a learning rate of 1 / steps decaying linearly to 0, keeping the best step."""

from __future__ import annotations

from lsiq.methods.base import Method, register
from lsiq.methods.trained import TrainedMethod

SIGNROUND_DEFAULTS = {**Method.defaults, "steps": 50, "batch_size": 2, "optimizer": "signsgd",
                      "lr_schedule": "linear", "keep_best": True, "lr_lwc": 0.0, "lwc_param": "linear"}


class SignRound(TrainedMethod):
    name = "signround"
    components = frozenset({"lwc", "rounding"})
    defaults = SIGNROUND_DEFAULTS
    saved_weights = {"fp32": 2.5, "bf16": 2.1}
    weight_traffic = {"fp32": (40.6, 62.6), "bf16": (43.6, 65.6)}


register(SignRound())
