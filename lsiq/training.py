"""The training loop of the trained methods: minimise the block-output error of a BlockQuantizer.

Each step draws a batch of the calibration samples (a fresh shuffle per pass, seeded), runs the
block with the step's fake-quantized weights on the quantized stream's inputs, and compares the
output with the FP block's output on the FP stream. With data-parallel workers each computes the
loss of the samples it owns and the gradients are summed (lsiq.parallel).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from lsiq.config import CalibConfig
from lsiq.forward import act_quant_hooks, autocast, batches, block_forward, device_of
from lsiq.optim import SignSGD
from lsiq.parallel import SampleShard, all_reduce_grads
from lsiq.trainable import BlockQuantizer


def block_loss(out: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Summed squared error; "token": each token's error relative to its FP output's mean square,
    times the batch's mean square, so that it keeps the scale of "mse"."""
    err = (out - target).pow(2)
    if kind == "mse":
        return err.sum()
    ms = target.pow(2).mean(-1, keepdim=True)
    return (err / ms.clamp_min(1e-30)).sum() * ms.mean()  # a zero target (an unrouted token): its error is 0


def make_optimizers(groups: list[dict[str, Any]]) -> list[torch.optim.Optimizer]:
    """One optimizer per kind named in the groups (lsiq.trainable.BlockQuantizer.param_groups)."""
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for g in groups:
        by_kind.setdefault(g["optimizer"], []).append(g)
    out: list[torch.optim.Optimizer] = []
    for kind, gs in by_kind.items():
        out.append(SignSGD(gs) if kind == "signsgd" else torch.optim.AdamW(gs, weight_decay=0.0))
    return out


def train(bq: BlockQuantizer, layer: nn.Module, layer_kwargs: dict[str, Any], inputs: torch.Tensor,
          targets: torch.Tensor, cfg: CalibConfig, shard: SampleShard, block_index: int,
          next_layer: nn.Module | None = None, on_step: Callable[[int, int, float], None] | None = None) -> list[float]:
    """Train ``bq`` for ``cfg.steps_for(shard.total)`` steps; returns the loss of every step.

    With ``cfg.average_tail`` > 0, ``bq`` ends with the mean of its parameters after each of the last
    ``ceil(average_tail * steps)`` steps (tail averaging: the last steps' one-sample noise averages
    out). Otherwise, with ``cfg.keep_best``, it ends with the parameters of the step whose
    training-batch loss was lowest (each step's loss is taken before its update, so the first
    candidate is where training started). Deterministic for a given ``cfg.seed`` and ``block_index``."""
    device = device_of(layer)
    n = shard.total
    steps = cfg.steps_for(n)
    opts = make_optimizers(bq.param_groups(steps))
    scheds = ([torch.optim.lr_scheduler.LinearLR(o, 1.0, 0.0, total_iters=steps) for o in opts]
              if cfg.lr_schedule == "linear" else [])
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + block_index)
    per_sample = targets[0].numel()
    learnable = [p for o in opts for g in o.param_groups for p in g["params"]]
    losses: list[float] = []
    best_loss, best_state = math.inf, None
    # tail averaging: the running mean of the parameters after each of the last steps (every
    # data-parallel worker holds the same parameters, so the same mean)
    avg_from = steps - math.ceil(cfg.average_tail * steps) if cfg.average_tail > 0 else steps
    avg_state: list[torch.Tensor] | None = None

    def order() -> Iterator[torch.Tensor]:
        while True:  # one seeded shuffle per pass over the samples
            yield from batches(n, cfg.batch_size, torch.randperm(n, generator=gen))

    with act_quant_hooks(layer, cfg.abits):
        for step, idx in enumerate(itertools.islice(order(), steps)):
            # mean over the global batch = (sum over the samples each worker owns) / batch elements
            loc = shard.local(idx)
            for o in opts:
                o.zero_grad(set_to_none=True)
            loss_sum = torch.zeros((), dtype=torch.float64)
            if len(loc):
                with autocast(device, cfg.precision):
                    params = bq.effective()  # LSI recomposition + LET + LWC + rounding, once per step
                    out = block_forward(layer, inputs[loc].to(device), layer_kwargs, params)
                target = targets[loc].to(device)
                loss = block_loss(out.float(), target, cfg.loss) / (len(idx) * per_sample)
                if next_layer is not None and cfg.cross_layer:
                    with torch.no_grad(), autocast(device, cfg.precision):  # both at one precision
                        next_target = block_forward(next_layer, target, layer_kwargs).float()
                    with autocast(device, cfg.precision):
                        next_out = block_forward(next_layer, out, layer_kwargs)
                    loss = loss + cfg.cross_layer_weight * block_loss(
                        next_out.float(), next_target, cfg.loss) / (len(idx) * per_sample)
                loss.backward()
                loss_sum = loss.detach().to(torch.float64).cpu()
                # this step's weights and graph: not kept into the next step
                params = out = loss = target = next_out = next_target = None
            if not shard.trivial:
                all_reduce_grads(learnable, shard)
                shard.all_reduce(loss_sum, "sum")
            if not torch.isfinite(loss_sum):
                raise FloatingPointError(f"block {block_index}: loss became {loss_sum.item()} at step {step}")
            if cfg.keep_best and avg_from == steps and loss_sum.item() < best_loss:
                best_loss = loss_sum.item()
                best_state = [p.detach().clone() for p in learnable]  # parameters only, not LSI's factors
            for o in opts:
                o.step()
            for sc in scheds:
                sc.step()
            bq.project()
            if step >= avg_from:
                with torch.no_grad():
                    if avg_state is None:
                        avg_state = [p.detach().clone() for p in learnable]
                    else:
                        for a, p in zip(avg_state, learnable, strict=True):
                            a.add_(p.detach() - a, alpha=1.0 / (step - avg_from + 1))
            losses.append(loss_sum.item())
            if on_step is not None:
                on_step(step + 1, steps, losses[-1])
    if avg_state is not None:
        best_state = avg_state
    if best_state is not None:
        with torch.no_grad():
            for p, best in zip(learnable, best_state, strict=True):
                p.copy_(best)
    return losses
