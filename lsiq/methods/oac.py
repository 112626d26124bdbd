"""OAC, output-adaptive calibration (lsiq.oac): GPTQ with Hessians weighted by the model loss's
gradients at each linear's output, which the pipeline's streamed backward pass supplies."""

from __future__ import annotations

from lsiq.forward import device_of
from lsiq.methods.base import BlockJob, Calibrated, Method, register
from lsiq.methods.closed_form import plain_tensors
from lsiq.methods.gptq import gptq_linears
from lsiq.oac import oac_hessians
from lsiq.stats import solve_dtype


class OAC(Method):
    name = "oac"
    hessians = True
    needs_output_grads = True

    def calibrate(self, job: BlockJob) -> Calibrated:
        if job.output_grads is None or job.fp_inputs is None:
            raise ValueError("method oac needs the FP inputs and the loss gradients at the block's output "
                             "(the pipeline's OAC pass computes them; see lsiq.oac)")
        cfg, shard = job.cfg, job.shard
        hess = oac_hessians(job.layer, job.fp_inputs, job.output_grads, job.layer_kwargs,
                            cfg.forward_batch(shard.world), solve_dtype(cfg, device_of(job.layer)), job.arch.linears)
        if not shard.trivial:  # summed over every worker's tokens
            for h in hess.values():
                shard.all_reduce(h, "sum")
        return Calibrated(gptq_linears(job, hess), plain_tensors(job.layer, job.arch))


register(OAC())
