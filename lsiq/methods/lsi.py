"""LSI, learnable singular-value increments (lsiq.lsi) on top of OmniQuant's LWC and LET."""

from __future__ import annotations

from lsiq.methods.base import register
from lsiq.methods.trained import TrainedMethod


class LSIMethod(TrainedMethod):
    name = "lsi"
    components = frozenset({"lsi", "let", "lwc"})
    saved_weights = {"fp32": 4.9, "bf16": 4.1}
    weight_traffic = {"fp32": (62.6, 88.2), "bf16": (70.0, 97.2)}


register(LSIMethod())
