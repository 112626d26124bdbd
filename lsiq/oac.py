"""OAC, output-adaptive calibration (paper 002): GPTQ with Hessians from the model's output loss.

GPTQ weighs every token's input the same (H = X^T X). OAC asks how much each linear's output
matters to the model's final cross-entropy. With g_t = dL/dy_t the gradient of the loss at the
linear's output for token t, the Fisher approximation of the loss Hessian of row j of W is
sum_t g_tj^2 x_t x_t^T; sharing one Hessian across rows (as GPTQ's solver needs) by averaging them:

    H_OAC = sum_t (|g_t|^2 / out) x_t x_t^T,

GPTQ's X^T X with each token weighted by its output gradient's energy, at the same cost. (The
exact approximation in the paper is unconfirmed from its abstract; this per-token Fisher form is
the choice here.) The gradients come from the full-precision model, block by block so that memory
stays one block plus activations: a forward pass over the blocks keeping their boundary
activations, the loss at the head, then a backward pass in reverse that recomputes each block's
forward and hands dL/d(input) to the block before it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lsiq.archs.base import block_linears
from lsiq.forward import batches, block_forward


def head_loss(norm: nn.Module, lm_head: nn.Module, hidden: torch.Tensor, ids: torch.Tensor,
              predicted_total: int, softcap: float | None = None) -> torch.Tensor:
    """Summed next-token cross-entropy of ``hidden`` [B, L, H] (the last block's output) for tokens
    ``ids`` [B, L], divided by ``predicted_total``, the number of predicted tokens over every sample
    of every worker: each worker's gradient is then its share of the global mean's gradient.
    ``softcap``: the model's final logit soft-capping (Gemma 2: logits = c tanh(logits / c))."""
    logits = lm_head(norm(hidden)).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                             reduction="sum") / predicted_total


def head_gradient(norm: nn.Module, lm_head: nn.Module, hidden: torch.Tensor, ids: torch.Tensor,
                  predicted_total: int, batch_size: int, out: torch.Tensor | None = None,
                  softcap: float | None = None) -> tuple[torch.Tensor, float]:
    """dL/d(hidden) [N, L, H] of :func:`head_loss` (written into ``out`` if given), and this
    worker's part of the loss. Only the input gradient is computed, not the head's weights'."""
    grad = torch.empty_like(hidden) if out is None else out
    total = 0.0
    device = next(lm_head.parameters()).device
    for idx in batches(hidden.shape[0], batch_size):
        h = hidden[idx].to(device).detach().requires_grad_(True)
        loss = head_loss(norm, lm_head, h, ids[idx].to(device), predicted_total, softcap)
        (g,) = torch.autograd.grad(loss, h)
        grad[idx] = g.to(grad.device)
        total += loss.item()
    return grad, total


def block_backward(layer: nn.Module, inputs: torch.Tensor, grad_out: torch.Tensor, layer_kwargs: dict[str, Any],
                   batch_size: int, out: torch.Tensor | None = None, keep: bool = True) -> torch.Tensor | None:
    """dL/d(inputs) of one block, given dL/d(its outputs): its forward recomputed on ``inputs``.
    With ``keep=False`` the gradients are computed (for hooks on the block) but not stored."""
    device = next(layer.parameters()).device
    grad_in = (torch.empty_like(inputs) if out is None else out) if keep else None
    for idx in batches(inputs.shape[0], batch_size):
        x = inputs[idx].to(device).detach().requires_grad_(True)
        y = block_forward(layer, x, layer_kwargs)
        # only d/dx: the block's weights need no gradient (nor memory for one)
        (g,) = torch.autograd.grad(y, x, grad_out[idx].to(device))
        if grad_in is not None:
            grad_in[idx] = g.to(grad_in.device)
    return grad_in


def oac_hessians(layer: nn.Module, inputs: torch.Tensor, grad_out: torch.Tensor, layer_kwargs: dict[str, Any],
                 batch_size: int, dtype: torch.dtype = torch.float64, linears: tuple[str, ...] | None = None
                 ) -> dict[str, torch.Tensor]:
    """H_OAC [in, in] (in ``dtype``, summed over this worker's tokens) of every linear of the block
    (``linears``, default every nn.Linear in it), from its FP inputs and the loss gradient at its
    output (block_backward's recomputation). One per linear: each weighs its tokens by its own
    output's gradient, so linears that share an input do not share it."""
    device = next(layer.parameters()).device
    linears = linears if linears is not None else tuple(block_linears(layer))
    hess = {n: torch.zeros(layer.get_submodule(n).in_features, layer.get_submodule(n).in_features,
                           dtype=dtype, device=device) for n in linears}
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name in linears:
        mod = layer.get_submodule(name)
        handles.append(mod.register_forward_pre_hook(lambda m, a, n=name: seen.__setitem__(n, a[0].detach())))

        def on_grad(m: nn.Module, grad_in: Any, grad_output: tuple[torch.Tensor, ...], n: str = name) -> None:
            x = seen.pop(n).reshape(-1, m.in_features).to(dtype)
            g = grad_output[0].reshape(-1, grad_output[0].shape[-1]).to(dtype)
            w = g.pow(2).sum(-1, keepdim=True) / g.shape[-1]  # |g_t|^2 / out, one weight per token
            hess[n].addmm_(x.T, x * w)

        handles.append(mod.register_full_backward_hook(on_grad))
    try:
        block_backward(layer, inputs, grad_out, layer_kwargs, batch_size, keep=False)
    finally:
        for h in handles:
            h.remove()
    return hess

