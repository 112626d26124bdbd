"""LWC, OmniQuant's learnable weight clipping: each group's range is learned (lsiq.lwc)."""

from __future__ import annotations

from lsiq.methods.base import register
from lsiq.methods.trained import TrainedMethod


class LWCMethod(TrainedMethod):
    name = "lwc"
    components = frozenset({"lwc"})
    saved_weights = {"fp32": 4.1, "bf16": 3.6}
    weight_traffic = {"fp32": (41.2, 53.7), "bf16": (44.2, 56.7)}


register(LWCMethod())
