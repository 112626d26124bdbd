"""OmniQuant: learnable weight clipping plus the learnable equivalent transformation (lsiq.let)."""

from __future__ import annotations

from lsiq.methods.base import register
from lsiq.methods.trained import TrainedMethod


class LWCLET(TrainedMethod):
    name = "lwc-let"
    components = frozenset({"lwc", "let"})
    saved_weights = {"fp32": 3.55, "bf16": 3.05}
    weight_traffic = {"fp32": (50.4, 71.4), "bf16": (53.4, 74.4)}


register(LWCLET())
