"""python -m pipeline.evaluate: perplexity of an FP checkpoint or of our quantized output.

Definition (recomputable by anyone): tokenize each file's whole text with the model's tokenizer
(no special tokens), concatenate, cut into consecutive non-overlapping windows of L tokens (drop
the remainder), keep the first K, and take exp(mean next-token cross-entropy over every predicted
position of every window). The last stdout line is a JSON object with ``ppl`` and ``tokens``.
"""

from __future__ import annotations

import argparse
import json
import sys

from transformers import AutoTokenizer

from lsiq.evaluation import perplexity
from pipeline.config import parse_json_object
from pipeline.data import eval_windows
from pipeline.model_io import load_for_eval, local_copy


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
