"""Where SmolLM2's massive activations appear and which quantized linear breaks them.

For each block in --blocks (fed with the FP model's inputs of the calibration windows), prints:
the largest |residual| after the block and where it sits (position, channel), the share of the
block-output MSE that the top-k (position, channel) entries of the FP output carry, and, for each
linear quantized alone by round-to-nearest (the rest in FP), the block-output MSE, the MSE on the
massive entries and on the rest, and the relative error of the massive entries' values.

    python scripts/explore_massive.py --blocks 9 10 11 12 --wbits 2 --group-size 64
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoTokenizer

from lsiq.capture import capture_layer_inputs
from lsiq.forward import forward_all
from lsiq.quantizer import QuantSpec, fake_quant, minmax_scale_zero
from pipeline.checkpoint import Checkpoint
from pipeline.data import calibration_ids
from pipeline.model_io import decoder_layer, decoder_layer_class, skeleton, with_tensors


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="fixtures/smollm2")
    p.add_argument("--calib", default="fixtures/texts/calib.txt")
    p.add_argument("--blocks", type=int, nargs="+", default=[9, 10, 11, 12])
    p.add_argument("--wbits", type=int, default=2)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--topk", type=int, default=64, help="entries of the FP output counted as massive")
    a = p.parse_args()

    ck = Checkpoint(a.model)
    tok = AutoTokenizer.from_pretrained(a.model)
    ids = calibration_ids(tok, [a.calib], a.nsamples, a.seqlen, 0)
    model = with_tensors(skeleton(ck.config), ck.read(ck.other_names()))
    x, inputs = capture_layer_inputs(model, ids)
    linears = ck.arch.linears
    layer_cls = decoder_layer_class(ck.config)
    spec = QuantSpec(a.wbits, a.group_size)
    for b in range(max(a.blocks) + 1):
        layer = decoder_layer(layer_cls, ck.config, b, ck.read_block(b)[0])
        kw = inputs[b]  # block b's own mask and rotary embeddings
        y = forward_all(layer, x, kw, 4)
        if b in a.blocks:
            flat = y.abs().reshape(-1)
            top = flat.topk(a.topk).indices
            pos = (top // y.shape[-1]) % y.shape[1]
            chan = top % y.shape[-1]
            mask = torch.zeros_like(flat, dtype=torch.bool)
            mask[top] = True
            mask = mask.view_as(y)
            row = {"block": b, "max_in": x.abs().max().item(), "max_out": y.abs().max().item(),
                   "median_out": y.abs().median().item(),
                   "massive_positions": sorted(set(pos.tolist()))[:8], "massive_channels": sorted(set(chan.tolist()))[:8]}
            print(json.dumps(row), flush=True)
            sd = {k: v for k, v in layer.state_dict().items()}
            for name in (*linears, "all"):
                params = dict(sd)
                for n in (linears if name == "all" else (name,)):
                    w = sd[f"{n}.weight"]
                    params[f"{n}.weight"] = fake_quant(w, *minmax_scale_zero(w, spec), spec)
                yq = forward_all(layer, x, kw, 4, params=params)
                err = (yq - y) ** 2
                rel = ((yq - y)[mask].abs() / y[mask].abs()).mean().item()
                print(json.dumps({"block": b, "quantized": name, "mse": err.mean().item(),
                                  "mse_massive_share": (err[mask].sum() / err.sum()).item(),
                                  "mse_rest": err[~mask].mean().item(), "massive_rel_err": rel}), flush=True)
        x = y
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
