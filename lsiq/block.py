"""Calibration of one transformers decoder block by any registered method (lsiq.methods).

Input: the model's own decoder layer (fp32 weights), the keyword arguments the model passes to its
layers (rotary position embeddings, mask), the cached inputs that the already-quantized blocks
produced and the FP block's targets. Output: integer weights, scales and zero points for every
linear, the block's other (possibly folded) tensors, and the losses before and after.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lsiq import methods
from lsiq.archs.base import BlockArch
from lsiq.config import CalibConfig
from lsiq.forward import output_errors
from lsiq.lowrank import add_lowrank
from lsiq.methods.base import BlockJob
from lsiq.parallel import SampleShard
from lsiq.quantizer import QuantSpec, fake_quant, minmax_scale_zero
from lsiq.results import BlockResult


def rtn_params(layer: nn.Module, spec: QuantSpec, linears: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The block's parameters with every linear's weight rounded to nearest (the reference loss)."""
    params = {}
    for name in linears:
        w = layer.get_submodule(name).weight.detach()
        params[f"{name}.weight"] = fake_quant(w, *minmax_scale_zero(w, spec), spec)
    return params


def calibrate_block(layer: nn.Module, layer_kwargs: dict[str, Any], inputs: torch.Tensor, targets: torch.Tensor,
                    arch: BlockArch, cfg: CalibConfig, block_index: int = 0,
                    fp_inputs: torch.Tensor | None = None,
                    on_step: Callable[[int, int, float], None] | None = None,
                    shard: SampleShard | None = None, next_layer: nn.Module | None = None,
                    output_grads: torch.Tensor | None = None, measure_after: bool = True,
                    measure_before: bool = True) -> BlockResult:
    """Quantize one block with ``cfg.method``.

    ``inputs``: [N, L, hidden], the previous quantized blocks' outputs; ``targets``: the FP block's
    output on the FP inputs; ``fp_inputs`` (optional) feed the LET activation statistics.
    ``next_layer`` (with ``cfg.cross_layer``): block i+1 in full precision; each step's loss adds
    ``cfg.cross_layer_weight`` x the MSE between it fed with this block's quantized output and it fed
    with the FP targets (computed per batch: no extra cache). The reported losses before and after
    stay this block's own output MSE. ``output_grads`` (methods that need them, OAC): dL/d(block
    output) of the model's loss for the FP stream's samples, [N, L, hidden] like ``fp_inputs``.
    ``measure_after=False`` leaves the errors after calibration to the caller (NaN here): a caller
    that runs the quantized block over every sample anyway (the next block's inputs) measures them
    there, one pass fewer; ``measure_before=False`` skips round-to-nearest's (NaN; a unit of a
    mixture-of-experts block, lsiq.moe). A mixture-of-experts block (``arch.moe``) is calibrated
    by lsiq.moe.calibrate_moe_block, its result under checkpoint names. ``layer`` is left unchanged.
    Deterministic for a given ``cfg.seed`` and ``block_index``.
    With ``shard``, this is one of several data-parallel workers holding some of the samples.
    """
    if getattr(arch, "moe", False):
        from lsiq.moe import calibrate_moe_block

        if next_layer is not None or output_grads is not None:
            raise ValueError("mixture-of-experts blocks: cross-layer learning and output gradients (OAC) are not supported")
        return calibrate_moe_block(layer, layer_kwargs, inputs, targets, arch, cfg, block_index, fp_inputs, shard,
                                   measure_after)
    shard = shard or SampleShard.whole(inputs.shape[0])
    t0 = time.perf_counter()
    for p in layer.parameters():
        p.requires_grad_(False)
    if next_layer is not None:
        for p in next_layer.parameters():
            p.requires_grad_(False)
    fb = cfg.forward_batch(shard.world)
    loss_rtn = rel_rtn = float("nan")
    if measure_before:
        loss_rtn, rel_rtn = output_errors(layer, inputs, targets, layer_kwargs, fb,
                                          rtn_params(layer, cfg.spec, arch.linears), cfg.abits, shard)
    job = BlockJob(layer, layer_kwargs, inputs, targets, arch, cfg, shard, block_index, fp_inputs, next_layer,
                   output_grads, on_step)
    out = methods.get(cfg.method).calibrate(job)
    del job
    result = BlockResult(out.linears, out.tensors, loss_before=loss_rtn, loss_after=float("nan"), losses=out.losses,
                         trainable_params=out.trainable_params, rel_before=rel_rtn)
    if cfg.lowrank is not None:
        fp = out.fp_weights or {n: layer.get_submodule(n).weight.detach() for n in arch.linears}
        out = None  # the solves need only the FP targets and the codes
        add_lowrank(layer, inputs, layer_kwargs, cfg, result, fp, shard, groups=arch.input_groups)
    out = None
    if measure_after:
        result.loss_after, result.rel_after = output_errors(layer, inputs, targets, layer_kwargs, fb,
                                                            result.dequantized_params(), cfg.abits, shard)
    result.seconds = time.perf_counter() - t0
    return result
