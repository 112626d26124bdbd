"""I/O overhead of a streamed run: SmolLM2-135M quantized with LSI from S3 into S3.

Starts a real S3 server (SeaweedFS on 127.0.0.1), uploads the SmolLM2 fixture, runs
``python -m pipeline.quantize`` S3 -> S3 in a fresh process, and compares the wall time with the
calibrator's summed compute time (every block's calibrate call). Everything else (process start,
Ray start, storage reads and writes, object store transfers) is the overhead; the target is at
most 10 % of the wall time, thanks to the reader's prefetch and the writer's background uploads.

    python scripts/bench_io.py                      # 16 x 256 tokens, 5 epochs (the quality bench's setting)
    python scripts/bench_io.py --epochs 2 --out bench_out/io

Needs the fixtures (python -m pipeline.fixtures smollm2 fixtures/smollm2; ... texts fixtures/texts).
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

from tests.conftest import upload_dir  # noqa: E402
from tests.s3_server import start_s3_server  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--fixtures", default=str(ROOT / "fixtures"))
    p.add_argument("--out", default=str(ROOT / "bench_out" / "io"))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fixtures = Path(args.fixtures)
    with tempfile.TemporaryDirectory(prefix="lsiq-s3-") as s3dir:
        server = start_s3_server(Path(s3dir))
        try:
            server.make_bucket("lsiq")
            src = upload_dir(server, fixtures / "smollm2", "smollm2")
            env = os.environ | server.credentials_env() | {"PYTHONPATH": str(ROOT)}
            report_path = out / "report.json"
            cmd = [sys.executable, "-m", "pipeline.quantize", "--model", src, "--output", "s3://lsiq/smollm2-lsi-w3",
                   "--storage-options", json.dumps({"client_kwargs": {"endpoint_url": server.endpoint}}),
                   "--calib", str(fixtures / "texts" / "calib.txt"), "--method", "lsi", "--wbits", "3",
                   "--group-size", "64", "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
                   "--epochs", str(args.epochs), "--report", str(report_path), "--restart"]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, env=env, cwd=ROOT)
            process_wall = time.perf_counter() - t0
        finally:
            server.stop(timeout=3)
    rep = json.loads(report_path.read_text())
    compute = rep["calib_seconds"]
    summary = {
        "process_wall_seconds": process_wall,
        "run_wall_seconds": rep["wall_seconds"],
        "calibration_compute_seconds": compute,
        "overhead_seconds": process_wall - compute,
        "overhead_fraction": (process_wall - compute) / process_wall,
        "phases": rep["phases"],
        "io_wait_seconds": rep["io_wait_seconds"],
        "read_seconds": sum(b["read_seconds"] for b in rep["blocks"]),
        "write_seconds": sum(b["write_seconds"] for b in rep["blocks"]),
        "bytes_read": rep["bytes_read"],
        "bytes_written": rep["bytes_written"],
        "peak_rss": rep["peak_rss"],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"wall {process_wall:.1f} s, calibration compute {compute:.1f} s, everything else "
          f"{summary['overhead_seconds']:.1f} s = {100 * summary['overhead_fraction']:.1f} % of the wall "
          f"(target <= 10 %: {'pass' if summary['overhead_fraction'] <= 0.10 else 'FAIL'}); reads took "
          f"{summary['read_seconds']:.1f} s and writes {summary['write_seconds']:.1f} s in the background, "
          f"the calibrator waited {summary['io_wait_seconds']:.1f} s on them")
    return 0 if summary["overhead_fraction"] <= 0.10 else 1


if __name__ == "__main__":
    raise SystemExit(main())
