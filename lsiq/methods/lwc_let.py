"""OmniQuant: learnable weight clipping plus the learnable equivalent transformation (lsiq.let)."""

from __future__ import annotations

from lsiq.methods.base import register
from lsiq.methods.trained import TrainedMethod


class LWCLET(TrainedMethod):
    name = "lwc-let"
    components = frozenset({"lwc", "let"})
    saved_weights = {"fp32": 5.0, "bf16": 4.6}
    weight_traffic = {"fp32": (57.4, 71.8), "bf16": (60.4, 74.8)}


register(LWCLET())
