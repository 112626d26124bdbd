"""LWC, OmniQuant's learnable weight clipping: each group's range is learned (lsiq.lwc)."""

from __future__ import annotations

from lsiq.methods.base import register
from lsiq.methods.trained import TrainedMethod


class LWCMethod(TrainedMethod):
    name = "lwc"
    components = frozenset({"lwc"})
    saved_weights = {"fp32": 2.55, "bf16": 2.1}
    weight_traffic = {"fp32": (35.7, 54.8), "bf16": (38.7, 57.8)}


register(LWCMethod())
