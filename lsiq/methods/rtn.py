"""RTN: round to nearest on each group's min/max grid (the baseline every other method starts from)."""

from __future__ import annotations

import torch

from lsiq.methods.base import BlockJob, Calibrated, Method, register
from lsiq.methods.closed_form import plain_tensors
from lsiq.quantizer import minmax_scale_zero, quantize_codes
from lsiq.results import QuantizedLinear


class RTN(Method):
    name = "rtn"

    @torch.no_grad()
    def calibrate(self, job: BlockJob) -> Calibrated:
        spec = job.cfg.spec
        linears = {}
        for name in job.arch.linears:
            w = job.layer.get_submodule(name).weight.detach()
            scale, zero = minmax_scale_zero(w, spec)
            linears[name] = QuantizedLinear(quantize_codes(w, scale, zero, spec), scale, zero, spec)
        return Calibrated(linears, plain_tensors(job.layer, job.arch))


register(RTN())
