"""Shared parts of the methods that quantize in closed form: the block's other tensors as they are."""

from __future__ import annotations

import torch
from torch import nn

from lsiq.archs.base import BlockArch


def plain_tensors(layer: nn.Module, arch: BlockArch) -> dict[str, torch.Tensor]:
    """Every tensor of the block except its quantized linears' weights (norms, biases), copied."""
    weights = {f"{n}.weight" for n in arch.linears}
    return {k: v.detach().clone() for k, v in layer.state_dict().items() if k not in weights}
