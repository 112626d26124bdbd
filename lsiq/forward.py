"""Running a decoder block on cached samples: plain or with substituted parameters, with the
activation quantizers of weight-activation runs, in micro-batches, and its output MSE."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from lsiq.archs.base import block_linears
from lsiq.parallel import SampleShard
from lsiq.quantizer import ActQuantizer


def block_forward(layer: nn.Module, x: torch.Tensor, layer_kwargs: dict[str, Any],
                  params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Run the decoder layer, optionally with substituted parameters (names relative to it)."""
    if params is None:
        out = layer(x, **layer_kwargs)
    else:
        out = functional_call(layer, params, (x,), layer_kwargs, strict=False)
    return out[0] if isinstance(out, tuple) else out


class WithInputs(nn.Module):
    """A decoder layer bound to its own per-layer inputs (lsiq.capture.LayerInputs): called with
    another layer's keyword arguments (cross-layer learning runs block i+1 with block i's, and
    the two may differ in mask and rotary embeddings), it uses its own."""

    def __init__(self, layer: nn.Module, layer_kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.layer = layer
        self.layer_kwargs = layer_kwargs

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return self.layer(hidden_states, **self.layer_kwargs)


@contextlib.contextmanager
def act_quant_hooks(layer: nn.Module, bits: int, linears: tuple[str, ...] | None = None) -> Iterator[None]:
    """Quantize the input of every linear of the block (``linears``, default every nn.Linear in it)
    per token while inside the context."""
    quant = ActQuantizer(bits)
    handles = []
    if quant.enabled:
        for name in (linears if linears is not None else block_linears(layer)):
            handles.append(layer.get_submodule(name).register_forward_pre_hook(lambda m, a: (quant(a[0]), *a[1:])))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def batches(n: int, batch_size: int, order: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
    idx = order if order is not None else torch.arange(n)
    for i in range(0, n, batch_size):
        yield idx[i:i + batch_size]


@torch.no_grad()
def forward_all(layer: nn.Module, inputs: torch.Tensor, layer_kwargs: dict[str, Any], batch_size: int,
                params: dict[str, torch.Tensor] | None = None, abits: int = 16,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Block outputs for every cached sample, kept where the inputs live (or written into ``out``,
    e.g. a memory-mapped cache)."""
    device = device_of(layer)
    outs = torch.empty_like(inputs) if out is None else out
    with act_quant_hooks(layer, abits):
        for idx in batches(inputs.shape[0], batch_size):
            outs[idx] = block_forward(layer, inputs[idx].to(device), layer_kwargs, params).to(outs.device)
    return outs


@torch.no_grad()
def output_errors(layer: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, layer_kwargs: dict[str, Any],
                  batch_size: int, params: dict[str, torch.Tensor] | None, abits: int,
                  shard: SampleShard | None = None) -> tuple[float, float]:
    """Block-output MSE and relative error over every cached sample (of every worker, with ``shard``).

    The relative error is each token's squared error over its FP output's mean square, averaged over
    tokens: the "token" loss's measure. The MSE is dominated by the few positions that carry massive
    activations; the relative error weighs every token alike."""
    device = device_of(layer)
    acc = _ErrorSums()
    with act_quant_hooks(layer, abits):
        for idx in batches(inputs.shape[0], batch_size):
            acc.add(block_forward(layer, inputs[idx].to(device), layer_kwargs, params), targets[idx].to(device))
    return acc.result(shard)


@torch.no_grad()
def stream_errors(outputs: torch.Tensor, targets: torch.Tensor, batch_size: int,
                  shard: SampleShard | None = None, device: torch.device | None = None) -> tuple[float, float]:
    """:func:`output_errors` of outputs already computed (the quantized block's, cached for the next block)."""
    acc = _ErrorSums()
    for idx in batches(outputs.shape[0], batch_size):
        acc.add(outputs[idx].to(device), targets[idx].to(device))
    return acc.result(shard)


class _ErrorSums:
    """Running sums of squared errors and per-token relative errors over micro-batches."""

    def __init__(self) -> None:
        self.sq = self.rel = 0.0
        self.n = self.tokens = 0

    def add(self, out: torch.Tensor, target: torch.Tensor) -> None:
        err = (out - target).pow(2)
        self.sq += err.sum().item()
        self.rel += (err.mean(-1) / target.pow(2).mean(-1).clamp_min(1e-30)).sum().item()
        self.n += target.numel()
        self.tokens += target[..., 0].numel()

    def result(self, shard: SampleShard | None) -> tuple[float, float]:
        acc = torch.tensor([self.sq, float(self.n), self.rel, float(self.tokens)], dtype=torch.float64)
        if shard is not None:
            shard.all_reduce(acc, "sum")
        return (acc[0] / acc[1]).item(), (acc[2] / acc[3]).item()


def mean_loss(layer: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, layer_kwargs: dict[str, Any],
              batch_size: int, params: dict[str, torch.Tensor] | None, abits: int,
              shard: SampleShard | None = None) -> float:
    """Block-output MSE over every cached sample (of every worker, with ``shard``)."""
    return output_errors(layer, inputs, targets, layer_kwargs, batch_size, params, abits, shard)[0]


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def device_of(layer: nn.Module) -> torch.device:
    return next(layer.parameters()).device
