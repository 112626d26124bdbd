"""Statistics of a block's inputs that the methods start from: per-linear input autocorrelations
(GPTQ's Hessians, QERA's R), per-channel activation maxima (LET's SmoothQuant init), and the dtype
their closed-form solves run in."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lsiq.archs.base import BlockArch, ChannelPair, NormPair, block_linears
from lsiq.forward import act_quant_hooks, batches, block_forward, device_of
from lsiq.gptq import HessianAccumulator
from lsiq.let import smooth_scale
from lsiq.parallel import SampleShard

if TYPE_CHECKING:
    from lsiq.config import CalibConfig


def solve_dtype(cfg: CalibConfig, device: torch.device) -> torch.dtype:
    """The dtype of Hessians, autocorrelations and their solves (CalibConfig.solve_dtype)."""
    if cfg.solve_dtype == "auto":
        return torch.float64 if device.type == "cpu" else torch.float32
    return getattr(torch, cfg.solve_dtype)


@torch.no_grad()
def input_autocorrelations(layer: nn.Module, inputs: torch.Tensor, layer_kwargs: dict[str, Any], cfg: CalibConfig,
                           shard: SampleShard | None = None, params: dict[str, torch.Tensor] | None = None,
                           groups: tuple[tuple[str, ...], ...] | None = None) -> dict[str, torch.Tensor]:
    """2/n sum x x^T [in, in] (in :func:`solve_dtype`) of every linear's inputs over the calibration samples (all
    workers' samples when data-parallel), with the block run on ``params`` (default: its weights)
    and activation quantization on, so each linear sees what it will see at inference.

    ``groups``: linears that read one input (BlockArch.input_groups) share one matrix, built once
    and returned under each of their names (the same tensor; default: one per nn.Linear)."""
    device = device_of(layer)
    dtype = solve_dtype(cfg, device)
    groups = groups if groups is not None else tuple((n,) for n in block_linears(layer))
    accs = [HessianAccumulator(layer.get_submodule(g[0]).in_features, device, dtype) for g in groups]
    # The activation quantizers' hooks go first so that H is built from the inputs the layer sees.
    with act_quant_hooks(layer, cfg.abits):
        handles = [layer.get_submodule(g[0]).register_forward_pre_hook(lambda m, a, acc=acc: acc.add(a[0]))
                   for g, acc in zip(groups, accs, strict=True)]
        try:
            for idx in batches(inputs.shape[0], cfg.forward_batch(shard.world if shard is not None else 1)):
                block_forward(layer, inputs[idx].to(device), layer_kwargs, params)
        finally:
            for h in handles:
                h.remove()
    if shard is not None and not shard.trivial:
        for acc in accs:  # H of all samples = count-weighted mean of the workers' H
            n = torch.tensor([float(acc.n)], dtype=acc.h.dtype)
            acc.h *= acc.n
            shard.all_reduce(acc.h, "sum")
            shard.all_reduce(n, "sum")
            acc.h /= n.item()
    return {n: acc.h for g, acc in zip(groups, accs, strict=True) for n in g}


@torch.no_grad()
def input_absmax(layer: nn.Module, inputs: torch.Tensor, layer_kwargs: dict[str, Any],
                 batch_size: int, names: tuple[str, ...], shard: SampleShard | None = None) -> dict[str, torch.Tensor]:
    """Per-channel max |x| of the inputs of the named linears over the cached samples (of every worker)."""
    device = device_of(layer)
    stats: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable[..., None]:
        def fn(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            m = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0)
            stats[name] = torch.maximum(stats[name], m) if name in stats else m
        return fn

    handles = [layer.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        for idx in batches(inputs.shape[0], batch_size):
            block_forward(layer, inputs[idx].to(device), layer_kwargs)
    finally:
        for h in handles:
            h.remove()
    if shard is not None:
        for name in names:
            shard.all_reduce(stats[name], "max")
    return stats


def smooth_let_init(layer: nn.Module, arch: BlockArch, inputs: torch.Tensor, layer_kwargs: dict[str, Any],
                    batch_size: int, alpha: float, shard: SampleShard | None = None) -> dict[str, torch.Tensor]:
    """OmniQuant's LET initialisation from activation maxima (SmoothQuant) of the block's norm
    pairs and its (non-optional) channel pairs, GQA-aware for v -> o; the other pairs start at 1."""
    pairs = [p for p in arch.let_pairs if isinstance(p, NormPair | ChannelPair) and not p.optional]
    probe = tuple(p.linears[0] if isinstance(p, NormPair) else p.dst for p in pairs)
    acts = input_absmax(layer, inputs, layer_kwargs, batch_size, probe, shard)
    sd = layer.state_dict()

    def wmax(names: tuple[str, ...]) -> torch.Tensor:
        return torch.stack([sd[f"{n}.weight"].abs().amax(0) for n in names]).amax(0)

    out = {}
    for pair, name in zip(pairs, probe, strict=True):
        if isinstance(pair, NormPair):
            out[pair.name] = smooth_scale(acts[name], wmax(pair.linears), alpha)
        else:
            # v -> o: o reads n_heads * head_dim channels; the scale lives on the KV heads' channels,
            # so take the max over the query heads that share a KV head (groups = 1: one to one).
            g, w = pair.groups, pair.width
            act = acts[name].view(-1, g, w).amax(1).reshape(-1)
            wm = sd[f"{name}.weight"].abs().amax(0).view(-1, g, w).amax(1).reshape(-1)
            out[pair.name] = smooth_scale(act, wm, alpha)
    return out
