"""The weight side of a training step with the fused fake quantizer against autograd's op-by-op
chain: per step, rebuilding every linear's calibrated weight (LET, clipping grid, learned rounding,
fake quantizer) and backpropagating through it, on SmolLM2 blocks, both versions alternating in
one process so that the machine's load hits both alike. Prints milliseconds per step (median).

    python scripts/bench_fake_quant.py --blocks 0 3 --method lwc-let-round --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import lsiq.trainable
from lsiq.capture import decoder_layers
from lsiq.config import CalibConfig
from lsiq.quantizer import QuantSpec, fake_quant, grouped, round_ste
from lsiq.trainable import BlockQuantizer
from pipeline.checkpoint import Checkpoint
from pipeline.model_io import skeleton, with_tensors


def op_by_op(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec,
             offset: torch.Tensor | None = None) -> torch.Tensor:
    """The fake quantizer as a chain of autograd ops (what lsiq.quantizer.fake_quant computes)."""
    g, s, z = grouped(w, spec), scale.unsqueeze(-1), zero.unsqueeze(-1)
    x = g / s if offset is None else g / s + grouped(offset, spec)
    return (((round_ste(x) + z).clamp(0, spec.qmax) - z) * s).reshape(w.shape)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="fixtures/smollm2")
    p.add_argument("--blocks", type=int, nargs="+", default=[0, 3])
    p.add_argument("--method", default="lwc-let-round")
    p.add_argument("--wbits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="timed steps per version and block")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    ck = Checkpoint(a.model)
    model = with_tensors(skeleton(ck.config), ck.read(list(ck.tensors)))
    cfg = CalibConfig(method=a.method, wbits=a.wbits, group_size=a.group_size)
    for b in a.blocks:
        layer = decoder_layers(model)[b]
        for prm in layer.parameters():
            prm.requires_grad_(False)
        bq = BlockQuantizer(layer, ck.arch, cfg)
        grads = {k: torch.randn_like(v) for k, v in bq.effective().items() if v.requires_grad}
        times: dict[str, list[float]] = {"op-by-op": [], "fused": []}
        for i in range(2 * (a.steps + 2)):
            name = "fused" if i % 2 else "op-by-op"
            lsiq.trainable.fake_quant = fake_quant if name == "fused" else op_by_op
            t0 = time.perf_counter()
            params = bq.effective()
            sum((params[k] * g).sum() for k, g in grads.items()).backward()
            if i >= 4:  # the first two steps of each warm up
                times[name].append(time.perf_counter() - t0)
            bq.zero_grad(set_to_none=True)
        lsiq.trainable.fake_quant = fake_quant
        ms = {k: round(1000 * statistics.median(v), 1) for k, v in times.items()}
        print(json.dumps({"block": b, "method": a.method, "wbits": a.wbits, "ms_per_step": ms,
                          "saving": round(1 - ms["fused"] / ms["op-by-op"], 3)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
