"""SDE, singular-value diagonal expansion (CQE+): LSI plus learnable bands beside the singular
values' diagonal (--sde-band)."""

from __future__ import annotations

from lsiq.methods.base import register
from lsiq.methods.trained import TrainedMethod


class SDEMethod(TrainedMethod):
    name = "sde"
    components = frozenset({"lsi", "bands", "let", "lwc"})
    # SDE keeps what LSI keeps: its bands' products save views of U, and their sum replaces U diag(dS)
    saved_weights = {"fp32": 4.9, "bf16": 4.1}
    weight_traffic = {"fp32": (87.0, 127.5), "bf16": (94.4, 136.5)}


register(SDEMethod())
