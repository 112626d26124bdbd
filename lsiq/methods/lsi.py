"""LSI, learnable singular-value increments (lsiq.lsi) on top of OmniQuant's LWC and LET."""

from __future__ import annotations

from lsiq.methods.base import register
from lsiq.methods.trained import TrainedMethod


class LSIMethod(TrainedMethod):
    name = "lsi"
    components = frozenset({"lsi", "let", "lwc"})
    saved_weights = {"fp32": 6.5, "bf16": 5.75}
    weight_traffic = {"fp32": (70.1, 89.1), "bf16": (77.5, 98.1)}


register(LSIMethod())
