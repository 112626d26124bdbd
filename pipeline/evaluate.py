"""python -m pipeline.evaluate: perplexity of an FP checkpoint or of our quantized output.

Definition (recomputable by anyone): tokenize each file's whole text with the model's tokenizer
(no special tokens), concatenate, cut into consecutive non-overlapping windows of L tokens (drop
the remainder), keep the first K, and take exp(mean next-token cross-entropy over every predicted
position of every window). The last stdout line is a JSON object with ``ppl`` and ``tokens``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
from transformers import AutoTokenizer

from pipeline.config import parse_json_object
from pipeline.data import eval_windows
from pipeline.model_io import load_for_eval, local_copy


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 1, progress: bool = False) -> float:
    """exp of the mean next-token cross-entropy over every predicted position of every window."""
    total, count = 0.0, 0
    t0 = time.perf_counter()
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i:i + batch_size]
        logits = model(input_ids=ids, use_cache=False).logits.float()
        total += torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
        count += ids[:, 1:].numel()
        if progress:
            done = min(i + batch_size, windows.shape[0])
            eta = (time.perf_counter() - t0) / done * (windows.shape[0] - done)
            print(f"\reval {done}/{windows.shape[0]} windows  ppl so far {math.exp(total / count):.3f}  "
                  f"ETA {eta:.0f}s", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return math.exp(total / count)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="FP checkpoint or our quantized output: a path or an fsspec URL (s3://..., downloaded first)")
    p.add_argument("--storage-options", type=parse_json_object, default={}, metavar="JSON",
                   help="fsspec options for a remote --model (endpoint URL and the like)")
    p.add_argument("--text", nargs="+", required=True, metavar="FILE", help="evaluation text file(s)")
    p.add_argument("--seqlen", type=int, default=512, help="window length L in tokens")
    p.add_argument("--max-windows", type=int, default=None, help="keep only the first K windows")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    a = p.parse_args(argv)
    try:
        with local_copy(a.model, a.storage_options) as path:
            tokenizer = AutoTokenizer.from_pretrained(path)
            windows = eval_windows(tokenizer, a.text, a.seqlen, a.max_windows)
            model, hooks = load_for_eval(path)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with hooks:
        ppl = perplexity(model, windows, a.batch_size, progress=sys.stderr.isatty())
    print(json.dumps({"ppl": ppl, "tokens": windows.numel(), "predicted_tokens": windows.shape[0] * (a.seqlen - 1),
                      "windows": windows.shape[0], "seqlen": a.seqlen, "model": a.model}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
