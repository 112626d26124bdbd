"""Block-by-block calibration of SmolLM2 in one process (no Ray, no storage writes), for exploring
methods on the first blocks and on whole models quickly.

The calibration windows are `pipeline.data.calibration_ids(tok, [calib], N, L, seed)`, the same ids
`pipeline.quantize` draws; each block is calibrated on the quantized stream against the FP block's
output on the FP stream, exactly as the pipeline's calibrator does (its class is used directly).
Prints one JSON line per block (losses before/after, seconds) and, with --eval, the perplexity of
the model whose first --blocks blocks are quantized (the rest FP) on the first --eval-windows
512-token windows of each --eval text, the evaluator's definition.

    python scripts/explore_stream.py --method lsi --wbits 2 --blocks 12 --nsamples 32 --seqlen 512 \
        --set epochs=3 --eval fixtures/texts/eval.txt --out bench_out/explore/w2-lsi.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from lsiq.capture import capture_layer_inputs, decoder_layers
from lsiq.config import CalibConfig
from lsiq.evaluation import perplexity
from pipeline import formats
from pipeline.calibrator import BlockCalibrator
from pipeline.checkpoint import Checkpoint
from pipeline.data import calibration_ids, eval_windows
from pipeline.model_io import skeleton, with_tensors


def parse_value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(v.lower(), v)


def register_combo(name: str) -> None:
    """Register a trained method named by its components joined with '+' (e.g. lwc+rounding+let),
    with SignRound's defaults, for exploration only."""
    from lsiq import methods
    from lsiq.methods.signround import SignRound
    from lsiq.trainable import COMPONENTS

    comps = frozenset(name.split("+"))
    if not comps <= set(COMPONENTS):
        raise SystemExit(f"unknown components in {name}: {sorted(comps - set(COMPONENTS))}")
    if name not in methods.names():
        methods.register(type("Combo", (SignRound,), {"name": name, "components": comps})())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="fixtures/smollm2")
    p.add_argument("--calib", default="fixtures/texts/calib.txt")
    p.add_argument("--method", default="lsi")
    p.add_argument("--wbits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--blocks", type=int, default=0, help="blocks to quantize (0: all)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="CalibConfig fields")
    p.add_argument("--eval", nargs="*", default=[], metavar="FILE")
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--save-stream", default=None, metavar="PATH",
                   help="save both streams' inputs of block --blocks (and the layer kwargs) to PATH")
    p.add_argument("--out", default=None)
    p.add_argument("--label", default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    if "+" in a.method:  # an ad-hoc combination of components, trained like signround
        register_combo(a.method)
    over = dict(kv.split("=", 1) for kv in a.set)
    cfg = CalibConfig(method=a.method, wbits=a.wbits, group_size=a.group_size, seed=a.seed,
                      **{k: parse_value(v) for k, v in over.items()})
    ck = Checkpoint(a.model)
    tok = AutoTokenizer.from_pretrained(a.model)
    ids = calibration_ids(tok, [a.calib], a.nsamples, a.seqlen, a.seed)
    model = with_tensors(skeleton(ck.config), ck.read(ck.other_names()))
    hidden, kw = capture_layer_inputs(model, ids)  # every layer type's inputs
    cal = BlockCalibrator(ck.config.to_dict(), cfg)
    cal.set_inputs((hidden, kw))
    n = a.blocks or ck.arch.num_layers
    out = Path(a.out) if a.out else None
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
    label = a.label or f"{a.method} w{a.wbits} {' '.join(a.set)}"
    quantized: dict[str, torch.Tensor] = {}
    t_all = time.perf_counter()
    for b in range(n):
        tensors, _ = ck.read_block(b)
        r = cal.calibrate(b, tensors, {"bytes_read": 0, "read_seconds": 0.0, "peak_rss_reader": 0, "fingerprint": ""})
        s = r["stats"]
        quantized.update(formats.dequantize_tensors(cal.fmt, r["tensors"], cal.cfg.spec))  # checkpoint names
        row = {"label": label, "block": b, "loss_before": s["loss_before"], "loss_after": s["loss_after"],
               "gain": 1 - s["loss_after"] / s["loss_before"], "seconds": round(s["seconds"], 1),
               "first_loss": s["losses"][0] if s["losses"] else None, "last_loss": s["losses"][-1] if s["losses"] else None}
        print(json.dumps(row), flush=True)
        if out:
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
    total = time.perf_counter() - t_all
    if a.save_stream:
        torch.save({"block": n, "q_in": cal.q_in, "fp_in": cal.fp_in, "kwargs": cal.inputs[n], "label": label}, a.save_stream)
    if a.eval:
        state = ck.read(list(ck.tensors))
        state.update(quantized)
        full = with_tensors(skeleton(ck.config), state)
        if getattr(ck.config, "tie_word_embeddings", False):
            full.tie_weights()
        full.eval()
        assert len(decoder_layers(full)) == ck.arch.num_layers
        res = {"label": label, "blocks": n, "calib_seconds": round(total, 1), "config": dataclasses.asdict(cfg)}
        for f in a.eval:
            win = eval_windows(tok, [f], 512, a.eval_windows)
            res[Path(f).stem] = perplexity(full, win, batch_size=4)
        print(json.dumps(res), flush=True)
        if out:
            with out.open("a") as fh:
                fh.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
