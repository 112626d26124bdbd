"""One peer tool's quantization of a model, run inside that tool's own venv by scripts/bench_peers.py.

It needs torch, transformers and the tool, nothing of this project except lsiq.evaluation's
perplexity (torch only). Reads the calibration token ids and the evaluation windows that
bench_peers.py wrote (so every tool sees the same ids and is scored on the same windows), times
the tool's quantization call, evaluates the tool's in-memory fake-quantized model in float32, and
writes one JSON object: ppl per text, quantization wall seconds, peak RSS.

    venv/bin/python scripts/peer_worker.py --tool autoround --model fixtures/smollm2 --data DATA.pt \
        --wbits 3 --group-size 64 --iters 50 --batch-size 2 --out result.json
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lsiq.evaluation import perplexity  # noqa: E402


def autoround(model, tok, ids: torch.Tensor, a: argparse.Namespace) -> dict:
    from auto_round import AutoRound

    dataset = [ids[i:i + 1] for i in range(ids.shape[0])]
    ar = AutoRound(model, tok, bits=a.wbits, group_size=a.group_size, sym=False, dataset=dataset,
                   nsamples=ids.shape[0], seqlen=ids.shape[1], iters=a.iters, batch_size=a.batch_size,
                   seed=a.seed, device_map="cpu")
    ar.quantize()
    return {"model": ar.model, "settings": {"iters": a.iters, "batch_size": a.batch_size}}


def llmcompressor(model, tok, ids: torch.Tensor, a: argparse.Namespace) -> dict:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    scheme = {"targets": ["Linear"], "weights": {"num_bits": a.wbits, "type": "int", "symmetric": False,
                                                 "strategy": "group", "group_size": a.group_size}}
    recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1])
    return {"model": model, "settings": {"actorder": "static (default)", "dampening_frac": 0.01}}


TOOLS = {"autoround": autoround, "llmcompressor": llmcompressor}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tool", choices=list(TOOLS), required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="torch file: calibration ids and evaluation windows")
    p.add_argument("--wbits", type=int, required=True)
    p.add_argument("--group-size", type=int, required=True)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = torch.load(a.data)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    t0 = time.perf_counter()
    res = TOOLS[a.tool](model, tok, data["calib_ids"], a)
    wall = time.perf_counter() - t0
    model = res["model"].float().eval()
    ppl = {name: perplexity(model, w, batch_size=4) for name, w in data["windows"].items()}
    import importlib.metadata as md

    version = md.version({"autoround": "auto-round", "llmcompressor": "llmcompressor"}[a.tool])
    Path(a.out).write_text(json.dumps({
        "tool": a.tool, "version": version, "ppl": ppl, "quant_wall_s": round(wall, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "settings": res["settings"], "threads": a.threads, "evaluated": "in memory (fake-quantized float32 model)"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
