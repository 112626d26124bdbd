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
from pipeline import storage
from pipeline.cli import BadInput
from pipeline.config import parse_json_object
from pipeline.data import eval_windows
from pipeline.model_io import load_for_eval, local_copy
from pipeline.resume import MANIFEST, RUN_RECORD


def check_model(url: str, storage_options: dict) -> None:
    """A clear error for a --model that is missing, not a checkpoint, or an unfinished run of ours."""
    fs, root = storage.filesystem(url, storage_options)
    if not storage.exists(fs, root):
        raise BadInput(f"--model {url}: no such file or directory")
    ours = storage.exists(fs, storage.join(root, RUN_RECORD))
    manifest = storage.join(root, MANIFEST)
    done = storage.exists(fs, manifest) and storage.read_json(fs, manifest).get("status") == "complete"
    if ours and not done:
        raise BadInput(f"--model {url}: an unfinished pipeline.quantize run (no complete {MANIFEST}); "
                       "rerun its command to finish it")
    if not storage.exists(fs, storage.join(root, "config.json")):
        raise BadInput(f"--model {url}: not a checkpoint (no config.json)")


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
    if a.seqlen < 2:
        raise BadInput(f"--seqlen must be >= 2, got {a.seqlen}")
    if a.max_windows is not None and a.max_windows < 1:
        raise BadInput(f"--max-windows must be >= 1, got {a.max_windows}")
    if a.batch_size < 1:
        raise BadInput(f"--batch-size must be >= 1, got {a.batch_size}")
    try:
        check_model(a.model, a.storage_options)
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
