"""Optimizers the trained methods choose from: AdamW (OmniQuant's) and signed gradient descent
(AutoRound's SignSGD: every parameter moves by exactly lr per step, in the direction opposite to
its gradient's sign, which suits bounded, grid-unit parameters such as rounding offsets)."""

from __future__ import annotations

import torch


class SignSGD(torch.optim.Optimizer):
    """p <- p - lr * sign(grad); no momentum, no weight decay."""

    def __init__(self, params, lr: float = 1e-2) -> None:
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 - torch.optim.Optimizer's signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(torch.sign(p.grad), alpha=-group["lr"])
        return loss
