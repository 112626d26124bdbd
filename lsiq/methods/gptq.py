"""GPTQ: each linear quantized column by column with second-order error feedback (lsiq.gptq), from
its inputs' Hessian 2 X^T X / n on the quantized stream."""

from __future__ import annotations

import torch

from lsiq.gptq import gptq_quantize
from lsiq.methods.base import BlockJob, Calibrated, Method, register
from lsiq.methods.closed_form import plain_tensors
from lsiq.quantizer import quantize_codes
from lsiq.results import QuantizedLinear
from lsiq.stats import input_autocorrelations


@torch.no_grad()
def gptq_linears(job: BlockJob, hess: dict[str, torch.Tensor]) -> dict[str, QuantizedLinear]:
    """GPTQ of every linear of the block with ``hess``; each Hessian is dropped once used (one
    shared by a group of linears once the group's last linear is solved)."""
    cfg = job.cfg
    linears = {}
    for name in job.arch.linears:
        w = job.layer.get_submodule(name).weight.detach()
        q, scale, zero = gptq_quantize(w, hess.pop(name), cfg.spec, damp=cfg.gptq_damp, actorder=cfg.gptq_actorder)
        linears[name] = QuantizedLinear(quantize_codes(q, scale, zero, cfg.spec), scale, zero, cfg.spec)
    return linears


class GPTQ(Method):
    name = "gptq"
    hessians = True

    def calibrate(self, job: BlockJob) -> Calibrated:
        hess = input_autocorrelations(job.layer, job.inputs, job.layer_kwargs, job.cfg, job.shard,
                                      groups=job.arch.input_groups)
        return Calibrated(gptq_linears(job, hess), plain_tensors(job.layer, job.arch))


register(GPTQ())
