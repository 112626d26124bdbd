"""Shared parts of the methods that quantize in closed form: the block's other tensors as they are."""

from __future__ import annotations

import torch
from torch import nn

from lsiq.arch import LINEARS


def plain_tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the block except the linears' weights (norms, biases), copied."""
    return {k: v.detach().clone() for k, v in layer.state_dict().items()
            if k.rsplit(".", 1)[0] not in LINEARS or not k.endswith(".weight")}
