"""RTN: round to nearest on each group's min/max grid (the baseline every other method starts from)."""

from __future__ import annotations

import torch

from lsiq.methods.base import BlockJob, Calibrated, Method, register
from lsiq.methods.closed_form import plain_tensors
from lsiq.results import QuantizedLinear


class RTN(Method):
    name = "rtn"

    @torch.no_grad()
    def calibrate(self, job: BlockJob) -> Calibrated:
        spec = job.cfg.spec
        linears = {}
        for name in job.arch.linears:
            linears[name] = QuantizedLinear.round_to_nearest(job.layer.get_submodule(name).weight.detach(), spec)
        return Calibrated(linears, plain_tensors(job.layer, job.arch))


register(RTN())
