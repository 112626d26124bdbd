"""The methods that learn: a set of components (lsiq.trainable) trained on the block-output error."""

from __future__ import annotations

from typing import ClassVar

import torch

from lsiq.config import CalibConfig
from lsiq.forward import device_of
from lsiq.gptq import gptq_quantize
from lsiq.methods.base import BlockJob, Calibrated, Method
from lsiq.stats import input_autocorrelations, smooth_let_init
from lsiq.trainable import BlockQuantizer
from lsiq.training import train


class TrainedMethod(Method):
    """A method that trains ``components`` block by block; subclasses name them and their defaults."""

    components: ClassVar[frozenset[str]] = frozenset()

    def check(self, cfg: CalibConfig) -> None:
        if cfg.round_init == "gptq" and "rounding" not in self.components:
            raise ValueError(f"round_init gptq needs learned rounding, which {self.name} does not use")
        if cfg.round_init == "gptq" and cfg.lwc_param != "linear":
            raise ValueError("round_init gptq needs lwc_param linear (training must start on GPTQ's grid)")

    def needs_hessians(self, cfg: CalibConfig) -> bool:
        return cfg.uses_rounding and cfg.round_init == "gptq"

    def calibrate(self, job: BlockJob) -> Calibrated:
        cfg = job.cfg
        let_init = None
        if cfg.uses_let and (cfg.let_init == "smooth" or (cfg.let_init == "auto" and cfg.abits < 16)):
            let_init = smooth_let_init(job.layer, job.arch, job.fp_inputs if job.fp_inputs is not None else job.inputs,
                                       job.layer_kwargs, cfg.forward_batch(job.shard.world), cfg.let_alpha, job.shard)
        round_init = gptq_offsets(job) if cfg.uses_rounding and cfg.round_init == "gptq" else None
        bq = BlockQuantizer(job.layer, job.arch, cfg, let_init, job.shard, round_init)
        del round_init
        trainable = bq.trainable_params()
        losses = train(bq, job.layer, job.layer_kwargs, job.inputs, job.targets, cfg, job.shard, job.block_index,
                       job.next_layer, job.on_step) if cfg.trains else []
        linears, tensors = bq.finalize()
        fp = bq.fp_weights() if cfg.lowrank is not None else None
        return Calibrated(linears, tensors, losses, trainable, fp)


@torch.no_grad()
def gptq_offsets(job: BlockJob) -> dict[str, torch.Tensor]:
    """Per linear, the rounding offsets (grid steps, [out, in]) that turn round-to-nearest on the FP
    weight's min/max grid into GPTQ's rounding (static activation order keeps that grid)."""
    cfg = job.cfg
    hess = input_autocorrelations(job.layer, job.inputs, job.layer_kwargs, cfg, job.shard, groups=job.arch.input_groups)
    out = {}
    for name in job.arch.linears:
        w = job.layer.get_submodule(name).weight.detach()
        q, scale, _zero = gptq_quantize(w, hess.pop(name), cfg.spec, damp=cfg.gptq_damp, actorder="static")
        s = scale.repeat_interleave(cfg.spec.group_len(w.shape[1]), dim=1).to(device_of(job.layer))
        out[name] = ((q - w) / s).contiguous()
    return out
