"""LSI hyper-parameter exploration on single SmolLM2 blocks, judged on held-out text.

For each block in --blocks, the FP model's inputs to that block are computed for the calibration
windows (calib.txt, seeded as in pipeline.quantize) and for held-out windows (the first windows of
--heldout, 256 tokens each). Each configuration calibrates the block on the calibration inputs and
reports the block-output MSE on the calibration and on the held-out inputs (FP inputs and FP
targets for both, so blocks are comparable in isolation). Cheap next to full perplexity runs:
seconds to a minute per configuration.

    python scripts/explore_lsi.py --blocks 5 15 25 --out bench_out/explore_lsi.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from transformers import AutoTokenizer

from lsiq.block import calibrate_block
from lsiq.capture import capture_first_layer_inputs
from lsiq.config import CalibConfig
from lsiq.forward import forward_all, mean_loss
from pipeline.checkpoint import Checkpoint
from pipeline.data import calibration_ids, eval_windows
from pipeline.model_io import decoder_layer, decoder_layer_class, skeleton, with_tensors

GRID = [  # (label, method, overrides)
    ("rtn", "rtn", {}),
    ("lwc", "lwc", {}),
    ("lwc-let", "lwc-let", {}),
    *[(f"lsi lr={lr:g}", "lsi", {"lr_lsi": lr}) for lr in (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)],
    ("lsi lr=1e-3 k=64", "lsi", {"lr_lsi": 1e-3, "lsi_block_k": 64}),
    ("lsi lr=1e-3 k=128", "lsi", {"lr_lsi": 1e-3, "lsi_block_k": 128}),
    ("lsi lr=1e-3 epochs=10", "lsi", {"lr_lsi": 1e-3, "epochs": 10}),
    ("lwc-let epochs=10", "lwc-let", {"epochs": 10}),
    *[(f"lsi relative lr={lr:g}", "lsi", {"lr_lsi": lr, "lsi_relative": True}) for lr in (1e-3, 3e-3, 1e-2)],
    # what the 70B plan trades for speed: bfloat16 autocast, and fewer, larger steps
    ("lsi", "lsi", {}),
    ("lsi bf16", "lsi", {"precision": "bf16"}),
    ("lsi batch=4", "lsi", {"batch_size": 4}),
    ("lsi batch=4 bf16", "lsi", {"batch_size": 4, "precision": "bf16"}),
    ("lsi batch=4 lr x2", "lsi", {"batch_size": 4, "lr_lsi": 2e-2, "lr_lwc": 2e-2, "lr_let": 1e-2}),
    ("lsi batch=4 lr x4", "lsi", {"batch_size": 4, "lr_lsi": 4e-2, "lr_lwc": 4e-2, "lr_let": 2e-2}),
    ("lsi batch=2", "lsi", {"batch_size": 2}),
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="fixtures/smollm2")
    p.add_argument("--calib", default="fixtures/texts/calib.txt")
    p.add_argument("--heldout", default="fixtures/texts/eval.txt")
    p.add_argument("--blocks", type=int, nargs="+", default=[5, 15, 25])
    p.add_argument("--wbits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--heldout-windows", type=int, default=16)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--only", nargs="*", default=None, help="labels of GRID to run (default all)")
    p.add_argument("--out", default="bench_out/explore_lsi.jsonl")
    a = p.parse_args()

    ck = Checkpoint(a.model)
    tok = AutoTokenizer.from_pretrained(a.model)
    ids = calibration_ids(tok, [a.calib], a.nsamples, a.seqlen, 0)
    held = eval_windows(tok, [a.heldout], a.seqlen, a.heldout_windows)
    model = with_tensors(skeleton(ck.config), ck.read(ck.other_names()))
    x_cal, kw = capture_first_layer_inputs(model, ids)
    x_held, _ = capture_first_layer_inputs(model, held)
    layer_cls = decoder_layer_class(ck.config)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for b in range(max(a.blocks) + 1):
        layer = decoder_layer(layer_cls, ck.config, b, ck.read_block(b)[0])
        y_cal, y_held = forward_all(layer, x_cal, kw, 4), forward_all(layer, x_held, kw, 4)
        if b in a.blocks:
            for label, method, over in GRID:
                if a.only and label not in a.only:
                    continue
                cfg = CalibConfig(**{"method": method, "wbits": a.wbits, "group_size": a.group_size,
                                     "epochs": a.epochs, **over})
                t0 = time.perf_counter()
                res = calibrate_block(layer, kw, x_cal, y_cal, ck.arch, cfg, b, fp_inputs=x_cal)
                held_mse = mean_loss(layer, x_held, y_held, kw, 4, res.dequantized_params(), cfg.abits)
                row = {"block": b, "label": label, "calib_mse": res.loss_after, "heldout_mse": held_mse,
                       "seconds": round(time.perf_counter() - t0, 1), "wbits": a.wbits, "group_size": a.group_size,
                       "config": {k: v for k, v in cfg.__dict__.items()}}
                print(json.dumps({k: row[k] for k in ("block", "label", "calib_mse", "heldout_mse", "seconds")}),
                      flush=True)
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
        x_cal, x_held = y_cal, y_held
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
