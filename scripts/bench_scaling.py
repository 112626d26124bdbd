"""Data-parallel calibration on one machine: 1 worker x 2 CPUs against 2 workers x 1 CPU.

Same SmolLM2-135M block, same calibration samples and settings; the block's inputs are the real
model's (embeddings -> blocks 0..i-1 in FP). Each configuration runs the real calibrator actors
(torch.distributed gloo between the two workers) in an embedded local Ray. Reports seconds per
block, bytes all-reduced per optimizer step and in total, and how far the two results differ.

    python scripts/bench_scaling.py                     # block 5, LSI W3 g64, 16 x 256 tokens, 2 epochs
    python scripts/bench_scaling.py --block 20 --epochs 5 --out bench_out/scaling

Needs the fixtures (python -m pipeline.fixtures smollm2 fixtures/smollm2; ... texts fixtures/texts).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ray  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from lsiq.capture import capture_first_layer_inputs  # noqa: E402
from lsiq.config import CalibConfig  # noqa: E402
from lsiq.parallel import shard_range  # noqa: E402
from pipeline import ray_env  # noqa: E402
from pipeline.calibrator import form_group, remote_calibrators  # noqa: E402
from pipeline.checkpoint import Checkpoint  # noqa: E402
from pipeline.data import calibration_ids  # noqa: E402
from pipeline.model_io import skeleton, with_tensors  # noqa: E402


def run_config(ckpt: Checkpoint, hidden: torch.Tensor, kwargs: dict, cfg: CalibConfig, block: int, workers: int,
               cpus: int) -> dict:
    n = hidden.shape[0]
    cals = remote_calibrators(ckpt.model_config_dict, cfg, "cpu", cpus, 0, workers, n)
    try:
        form_group(cals)
        ray.get([c.set_inputs.remote((hidden[shard_range(n, workers, r)], kwargs), block) for r, c in enumerate(cals)])
        meta = {"fingerprint": "", "bytes_read": 0, "read_seconds": 0.0, "peak_rss_reader": 0}
        tensors, _ = ckpt.read_block(block)
        results = ray.get([c.calibrate.remote(block, tensors, meta) for c in cals])
    finally:
        for c in cals:
            ray.kill(c)
    return {"workers": workers, "cpus_per_worker": cpus, "seconds": results[0]["stats"]["seconds"],
            "calib_seconds": results[0]["stats"]["calib_seconds"], "loss_before": results[0]["stats"]["loss_before"],
            "loss_after": results[0]["stats"]["loss_after"], "losses": results[0]["stats"]["losses"],
            "trainable_params": results[0]["stats"]["trainable_params"], "tensors": results[0]["tensors"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--block", type=int, default=5)
    p.add_argument("--method", default="lsi")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=2, help="global micro-batch (split across the workers)")
    p.add_argument("--fixtures", default=str(ROOT / "fixtures"))
    p.add_argument("--out", default=str(ROOT / "bench_out" / "scaling"))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fixtures = Path(args.fixtures)
    ckpt = Checkpoint(str(fixtures / "smollm2"))
    tok = AutoTokenizer.from_pretrained(str(fixtures / "smollm2"))
    ids = calibration_ids(tok, [str(fixtures / "texts" / "calib.txt")], args.nsamples, args.seqlen, 0)
    # the block's real inputs: embeddings, then the FP blocks before it
    names = ckpt.other_names() + [n for i in range(args.block) for n in ckpt.block_names(i)]
    model = with_tensors(skeleton(ckpt.config), ckpt.read(names))
    model.model.layers = model.model.layers[:args.block + 1]
    hidden, kwargs = capture_layer_inputs(model, ids, args.block)
    del model
    cfg = CalibConfig(method=args.method, wbits=3, group_size=64, epochs=args.epochs, batch_size=args.batch_size)
    ray_env.connect(num_cpus=2)
    try:
        one = run_config(ckpt, hidden, kwargs, cfg, args.block, 1, 2)
        two = run_config(ckpt, hidden, kwargs, cfg, args.block, 2, 1)
    finally:
        ray.shutdown()
    steps = len(one["losses"])
    per_step = 4 * one["trainable_params"] + 8  # fp32 gradients of the learnable parameters, plus the loss
    codes_differ = {}
    for k, v in one["tensors"].items():
        if k.endswith(".qweight"):
            codes_differ[k.split(".", 3)[-1]] = (v != two["tensors"][k]).float().mean().item()
    summary = {
        "block": args.block, "method": args.method, "nsamples": args.nsamples, "seqlen": args.seqlen,
        "epochs": args.epochs, "global_batch": args.batch_size, "steps": steps,
        "seconds_1x2": one["seconds"], "seconds_2x1": two["seconds"], "speedup": one["seconds"] / two["seconds"],
        "allreduce_bytes_per_step": per_step, "allreduce_bytes_total": per_step * steps,
        "block_weight_bytes_fp32": 4 * sum(t.numel() for t in ckpt.read_block(args.block)[0].values()),
        "loss_after_1x2": one["loss_after"], "loss_after_2x1": two["loss_after"],
        "loss_after_rel_diff": abs(one["loss_after"] - two["loss_after"]) / one["loss_after"],
        "max_step_loss_rel_diff": max(abs(a - b) / a for a, b in zip(one["losses"], two["losses"], strict=True)),
        "packed_words_differing": codes_differ,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


def capture_layer_inputs(model: torch.nn.Module, ids: torch.Tensor, block: int) -> tuple[torch.Tensor, dict]:
    """Inputs of decoder layer ``block``: run the FP prefix of the model on ``ids``."""
    hidden, kwargs = capture_first_layer_inputs(model, ids)
    with torch.no_grad():
        for layer in model.model.layers[:block]:
            out = layer(hidden, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
    return hidden, kwargs


if __name__ == "__main__":
    raise SystemExit(main())
