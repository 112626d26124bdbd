"""Quality benchmark on the bundled SmolLM2-135M: RTN, GPTQ, LWC, LWC+LET, LSI, SDE, LSI with
cross-layer learning, LSI with QERA corrections.

Each run is the real CLI: `python -m pipeline.quantize` (embedded local Ray) then
`python -m pipeline.evaluate` on eval.txt (Britannica, 512-token windows) and on docs.txt (Python's
language reference, a domain no setting was tuned on). Records both perplexities, quantization wall
time, peak RSS (max of driver and calibrator actor), trainable parameter count, the bytes of the
output's tensors and of its low-rank corrections; appends one JSON line per run to
OUT/results.jsonl and prints a Markdown table. Every run is written in --format native (the one
format every method can use), unless --extra says otherwise.

    python scripts/bench_quality.py                       # every setting and base method (long)
    python scripts/bench_quality.py --settings w3g64 --methods lsi --extra="--lr-lsi 3e-3" --label lsi-lr3e-3
    python scripts/bench_quality.py --settings w3g64 w2g64 --methods sde lsi+cross lsi+qera16 lsi+qera64

Settings: w3g64 (main), w2g64, w4g64 (W*A16, asymmetric, group 64) and w4a4 (per-channel W4,
per-token A4; only lwc-let and lsi are run there by default). Methods: the names below; the
default list is the base methods.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = {
    "w3g64": ["--wbits", "3", "--abits", "16", "--group-size", "64"],
    "w2g64": ["--wbits", "2", "--abits", "16", "--group-size", "64"],
    "w4g64": ["--wbits", "4", "--abits", "16", "--group-size", "64"],
    "w4a4": ["--wbits", "4", "--abits", "4", "--group-size", "0"],
}
VARIANTS = {  # name -> pipeline.quantize flags
    "rtn": ["--method", "rtn"], "gptq": ["--method", "gptq"], "lwc": ["--method", "lwc"],
    "lwc-let": ["--method", "lwc-let"], "lsi": ["--method", "lsi"], "sde": ["--method", "sde"],
    "lsi+cross": ["--method", "lsi", "--cross-layer"],
    "lsi+qera16": ["--method", "lsi", "--lowrank", "qera", "--rank", "16"],
    "lsi+qera64": ["--method", "lsi", "--lowrank", "qera", "--rank", "64"],
    "oac": ["--method", "oac"],
}
METHODS = ["rtn", "gptq", "lwc", "lwc-let", "lsi"]
W4A4_METHODS = ["lwc-let", "lsi"]


def ensure_fixtures(root: Path) -> tuple[Path, Path, Path, Path]:
    model, texts = root / "smollm2", root / "texts"
    if not (model / "model.safetensors.index.json").exists():
        subprocess.run([sys.executable, "-m", "pipeline.fixtures", "smollm2", str(model)], check=True)
    if not (texts / "docs.txt").exists():
        subprocess.run([sys.executable, "-m", "pipeline.fixtures", "texts", str(texts)], check=True)
    return model, texts / "calib.txt", texts / "eval.txt", texts / "docs.txt"


def tensor_bytes(model_dir: Path) -> int:
    """Bytes of every safetensors shard of an output (what a server downloads and loads)."""
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))


def evaluate(model: Path, eval_txt: Path, windows: int | None) -> dict:
    cmd = [sys.executable, "-m", "pipeline.evaluate", "--model", str(model), "--text", str(eval_txt), "--seqlen", "512"]
    if windows:
        cmd += ["--max-windows", str(windows)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def table(results: Path) -> str:
    """Markdown table of results.jsonl (the last row per setting and label wins)."""
    rows: dict[tuple[str, str], dict] = {}
    for line in results.read_text().splitlines():
        r = json.loads(line)
        rows[(r["setting"], r["label"])] = r
    out = ["| setting | method | ppl eval.txt | ppl docs.txt | quant wall s | calib s | peak RSS MB | trainable params "
           "| tensor MB | low-rank MB |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    order = {k: i for i, k in enumerate(["fp32", *SETTINGS])}
    for (setting, label), r in sorted(rows.items(), key=lambda kv: (order.get(kv[0][0], 99), -kv[1]["ppl"])):
        docs = f"{r['ppl_docs']:.2f}" if "ppl_docs" in r else ""
        mb = {k: f"{r[k] / 1e6:.2f}" if k in r else "" for k in ("tensor_bytes", "lowrank_bytes")}
        out.append(f"| {setting} | {label} | {r['ppl']:.2f} | {docs} | {r.get('quant_wall_s', '')} | {r.get('calib_s', '')} | "
                   f"{r.get('peak_rss_mb', '')} | {r.get('trainable_params', '')} | {mb['tensor_bytes']} | "
                   f"{mb['lowrank_bytes']} |")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fixtures", default="fixtures", help="where the bundled model and texts are (written if missing)")
    p.add_argument("--out", default="bench_out/quality", help="run outputs and results.jsonl")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--methods", nargs="+", default=None, choices=list(VARIANTS))
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-windows", type=int, default=64, help="first K 512-token windows of eval.txt (0 = all)")
    p.add_argument("--extra", default="", help="extra pipeline.quantize flags for every run")
    p.add_argument("--label", default=None, help="label of these runs in the table (default: method)")
    p.add_argument("--fp", action="store_true", help="also evaluate the FP model")
    p.add_argument("--table", action="store_true", help="only print the Markdown table of OUT/results.jsonl")
    a = p.parse_args()
    if a.table:
        print(table(Path(a.out) / "results.jsonl"))
        return 0

    model, calib, eval_txt, docs_txt = ensure_fixtures(Path(a.fixtures))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    windows = a.eval_windows or None
    if a.fp:
        ev = evaluate(model, eval_txt, windows)
        row = {"setting": "fp32", "method": "fp", "label": "fp", "ppl": ev["ppl"], "eval_tokens": ev["tokens"],
               "ppl_docs": evaluate(model, docs_txt, windows)["ppl"], "tensor_bytes": tensor_bytes(model)}
        print(json.dumps(row), flush=True)
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
    for setting in a.settings:
        methods = a.methods or (W4A4_METHODS if setting == "w4a4" else METHODS)
        for method in methods:
            label = a.label or method
            run_dir = out / f"{setting}-{label}"
            cmd = [sys.executable, "-m", "pipeline.quantize", "--model", str(model), "--output", str(run_dir / "model"),
                   "--calib", str(calib), *VARIANTS[method], *SETTINGS[setting], "--nsamples", str(a.nsamples),
                   "--seqlen", str(a.seqlen), "--epochs", str(a.epochs), "--seed", str(a.seed),
                   "--report", str(run_dir / "report.json"), "--restart", "--format", "native", *shlex.split(a.extra)]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wall = time.perf_counter() - t0
            rep = json.loads((run_dir / "report.json").read_text())
            ev = evaluate(run_dir / "model", eval_txt, windows)
            row = {"setting": setting, "method": method, "label": label, "ppl": ev["ppl"], "eval_tokens": ev["tokens"],
                   "ppl_docs": evaluate(run_dir / "model", docs_txt, windows)["ppl"],
                   "tensor_bytes": tensor_bytes(run_dir / "model"), "lowrank_bytes": rep.get("lowrank_bytes", 0),
                   "format": rep.get("format"),
                   "quant_wall_s": round(wall, 1), "calib_s": round(rep["calib_seconds"], 1),
                   "peak_rss_mb": round(max(rep["peak_rss"].values()) / 2**20),
                   "trainable_params": rep["trainable_params"],
                   "mean_block_loss_after": sum(b["loss_after"] for b in rep["blocks"]) / len(rep["blocks"]),
                   "command": " ".join(shlex.quote(c) for c in cmd)}
            print(json.dumps(row), flush=True)
            with results.open("a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
