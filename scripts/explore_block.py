"""Calibrate one SmolLM2 block from saved streams (scripts/explore_stream.py --save-stream) with
several settings, printing each one's loss curve summary and its final block-output MSE on the
calibration samples, and on held-out samples when the stream holds more than --train samples
(the last ones are held out).

    python scripts/explore_block.py --stream bench_out/explore/stream11.pt --train 24 \
        --try "method=signround steps=50 batch_size=2" "method=lwc-let-round loss=token"
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from explore_stream import parse_value, register_combo  # scripts/ is on sys.path when run as a script

from lsiq.arch import BlockArch
from lsiq.block import calibrate_block
from lsiq.config import CalibConfig
from lsiq.forward import forward_all, mean_loss
from pipeline.checkpoint import Checkpoint
from pipeline.model_io import decoder_layer, decoder_layer_class


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="fixtures/smollm2")
    p.add_argument("--stream", required=True)
    p.add_argument("--train", type=int, default=0, help="calibrate on the first N samples (0: all)")
    p.add_argument("--wbits", type=int, default=2)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--try", dest="tries", nargs="+", required=True, metavar="SETTINGS")
    p.add_argument("--curve", action="store_true", help="print every step's loss")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    st = torch.load(a.stream, weights_only=False)
    b = st["block"]
    ck = Checkpoint(a.model)
    arch = BlockArch.from_config(ck.config)
    layer = decoder_layer(decoder_layer_class(ck.config), ck.config, b, ck.read_block(b)[0])
    q_in, fp_in, kw = st["q_in"], st["fp_in"], st["kwargs"]
    targets = forward_all(layer, fp_in, kw, 4)
    ntr = a.train or q_in.shape[0]
    for t in a.tries:
        over = {k: parse_value(v) for k, v in (kv.split("=", 1) for kv in t.split())}
        if "+" in str(over.get("method", "")):
            register_combo(over["method"])
        cfg = CalibConfig(**{"wbits": a.wbits, "group_size": a.group_size, **over})
        t0 = time.perf_counter()
        r = calibrate_block(layer, kw, q_in[:ntr], targets[:ntr], arch, cfg, b, fp_inputs=fp_in[:ntr])
        row = {"block": b, "try": t, "before": r.loss_before, "after": r.loss_after,
               "gain": 1 - r.loss_after / r.loss_before, "seconds": round(time.perf_counter() - t0, 1)}
        if ntr < q_in.shape[0]:
            params = r.dequantized_params()
            from lsiq.block import rtn_params as _rtn_params
            row["held_rtn"] = mean_loss(layer, q_in[ntr:], targets[ntr:], kw, 4, _rtn_params(layer, cfg.spec, arch.linears), 16)
            row["held_after"] = mean_loss(layer, q_in[ntr:], targets[ntr:], kw, 4, params, 16)
        if r.losses:
            k = max(1, len(r.losses) // 10)
            row["curve"] = [round(sum(r.losses[i:i + k]) / len(r.losses[i:i + k]), 4) for i in range(0, len(r.losses), k)]
        print(json.dumps(row), flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
