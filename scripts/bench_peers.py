"""Side-by-side quality of our quantizer and its peers on the bundled SmolLM2-135M, in one command.

Every tool gets the same calibration token ids (`pipeline.data.calibration_ids(tok, [calib.txt],
N, L, 0)`) and is scored with the same perplexity definition (lsiq.evaluation) on the first 64
512-token windows of eval.txt (Britannica) and docs.txt (Python's language reference: a domain no
setting was chosen on). The peers run in venvs of their own under OUT (created on first use, torch
2.13.0 CPU pinned by a constraints file): AutoRound 0.16.1 (SignRound) and llm-compressor 0.14.0.1
(GPTQ, its defaults: static activation ordering, damping 0.01). Their results are their in-memory
fake-quantized float32 models; ours go through the real CLI (`python -m pipeline.quantize`,
embedded Ray) and are evaluated from the written checkpoint by `python -m pipeline.evaluate`.
Wall time is the quantization call (ours: the whole CLI run, Ray start-up, reads and writes
included); peak RSS is the tool's process (ours: the largest of driver and calibrator actor). All
tools use the same number of threads. Appends to OUT/results.jsonl and prints the table.

    python scripts/bench_peers.py                                  # W2/W3/W4 g64 at 32 x 512, all rows
    python scripts/bench_peers.py --settings w3g64 --rows ours ours-gptq llmcompressor
    python scripts/bench_peers.py --budget 16x256 --rows ours autoround
    python scripts/bench_peers.py --budget 16x256 --settings w3g64 --rows ours --seeds 0 --steps 20 50 200
    python scripts/bench_peers.py --table                          # only print the table

Rows: fp, rtn, llmcompressor, autoround (iters 50, batch 2), autoround-200 (iters 200, batch 2;
long, not run by default), ours-gptq, ours-lsi (LSI+LET+LWC, 3 epochs at batch 1: 96 sample passes
per block), ours (`pipeline.quantize` with no method or budget flag: the default method for the
bit width with its default 100 steps of one sample, AutoRound's 100 sample passes per block; one
row per --seeds value; seed 0 uses the peers' ids, seed s > 0 trains with seed s on the same ids),
ours-last and ours-best (the same, ending on the last step's parameters, or on those of the step
with the lowest one-sample loss, instead of the mean of the last quarter of the steps; not run by
default). Settings whose group size does not
divide SmolLM2's widths (g128: hidden 576) are run too: each tool's answer is recorded (ours and
llm-compressor refuse, AutoRound pads the last group with zeros).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import ensure_fixtures, evaluate  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PEERS = {  # venv name -> (pip requirement, worker --tool)
    "autoround": ("auto-round==0.16.1", "autoround"),
    "llmcompressor": ("llmcompressor==0.14.0.1", "llmcompressor"),
}
SETTINGS = {"w2g64": (2, 64), "w3g64": (3, 64), "w4g64": (4, 64), "w4g128": (4, 128)}
ROWS = ["fp", "rtn", "llmcompressor", "autoround", "autoround-200", "ours-gptq", "ours-lsi", "ours", "ours-last",
        "ours-best"]
VARIANTS = ("ours-last", "ours-best")  # the default with another choice of the parameters it ends on
DEFAULT_ROWS = [r for r in ROWS if r not in ("autoround-200", *VARIANTS)]
OURS = {  # row -> pipeline.quantize flags beyond the setting and budget
    "rtn": ["--method", "rtn"],
    "ours-gptq": ["--method", "gptq"],
    "ours-lsi": ["--method", "lsi", "--epochs", "3", "--batch-size", "1"],
    "ours": [],  # the default method with its default budget: 100 steps of 1 sample
    "ours-last": ["--average-tail", "0", "--no-keep-best"],  # the same, ending on the last step's parameters
    "ours-best": ["--average-tail", "0", "--keep-best"],  # ... on the step with the lowest one-sample loss
}
LABELS = {"fp": "FP32", "rtn": "RTN (ours, min/max)", "llmcompressor": "llm-compressor GPTQ",
          "autoround": "AutoRound, 50 iters x 2", "autoround-200": "AutoRound, 200 iters x 2",
          "ours-gptq": "ours, GPTQ", "ours-lsi": "ours, LSI (96 passes)", "ours": "ours, default",
          "ours-last": "ours, default, last step", "ours-best": "ours, default, best step"}


def ensure_venv(out: Path, name: str) -> Path:
    """OUT/venv-NAME with torch 2.13.0 (the local CPU build) and the pinned peer, built once."""
    venv = out / f"venv-{name}"
    py = venv / "bin" / "python"
    marker = venv / ".installed"
    req = PEERS[name][0]
    if marker.exists() and marker.read_text() == req:
        return py
    constraints = out / "constraints.txt"
    constraints.write_text("torch==2.13.0\n")
    print(f"setting up {venv} ({req}; a few minutes, once)", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run([*pip, "-c", str(constraints), req], check=True)
    marker.write_text(req)
    return py


def write_data(path: Path, model: Path, calib: Path, texts: dict[str, Path], nsamples: int, seqlen: int,
               windows: int) -> None:
    import torch
    from transformers import AutoTokenizer

    from pipeline.data import calibration_ids, eval_windows

    tok = AutoTokenizer.from_pretrained(model)
    torch.save({"calib_ids": calibration_ids(tok, [str(calib)], nsamples, seqlen, 0),
                "windows": {k: eval_windows(tok, [str(v)], 512, windows) for k, v in texts.items()}}, path)


def run_peer(out: Path, row: str, setting: str, model: Path, data: Path, threads: int, tag: str) -> dict:
    name = "autoround" if row.startswith("autoround") else "llmcompressor"
    py = ensure_venv(out, name)
    wbits, group = SETTINGS[setting]
    iters = 200 if row == "autoround-200" else 50
    res_path = out / "runs" / f"{tag}-{setting}-{row}.json"
    log = res_path.with_suffix(".log")
    res_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(py), str(REPO / "scripts" / "peer_worker.py"), "--tool", PEERS[name][1], "--model", str(model),
           "--data", str(data), "--wbits", str(wbits), "--group-size", str(group), "--iters", str(iters),
           "--batch-size", "2", "--threads", str(threads), "--out", str(res_path)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    with log.open("w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        return {"refused": _last_error(log), "command": shlex.join(cmd)}
    r = json.loads(res_path.read_text())
    return {"ppl_eval": r["ppl"]["eval"], "ppl_docs": r["ppl"]["docs"], "quant_wall_s": r["quant_wall_s"],
            "peak_rss_mb": r["peak_rss_mb"], "version": r["version"], "evaluated": r["evaluated"],
            "command": shlex.join(cmd)}


def run_ours(out: Path, row: str, setting: str, seed: int, model: Path, calib: Path, texts: dict[str, Path],
             nsamples: int, seqlen: int, threads: int, tag: str, steps: int | None = None,
             flags: list[str] | None = None) -> dict:
    wbits, group = SETTINGS[setting]
    extra = ([] if steps is None else ["--steps", str(steps)]) + (flags or [])
    run_dir = out / "runs" / (f"{tag}-{setting}-{row}-s{seed}" + ("" if steps is None else f"-{steps}steps")
                              + "".join(f.strip("-").replace(".", "") for f in flags or []))
    cmd = [sys.executable, "-m", "pipeline.quantize", "--model", str(model), "--output", str(run_dir / "model"),
           "--calib", str(calib), "--wbits", str(wbits), "--group-size", str(group), "--nsamples", str(nsamples),
           "--seqlen", str(seqlen), "--seed", str(seed), "--data-seed", "0", "--num-cpus", str(threads),
           "--report", str(run_dir / "report.json"), "--restart", *OURS[row], *extra]
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "quantize.log"
    t0 = time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO).returncode
    wall = time.perf_counter() - t0
    if rc != 0:
        return {"refused": _last_error(log), "exit": rc, "command": shlex.join(cmd)}
    rep = json.loads((run_dir / "report.json").read_text())
    ev = {k: evaluate(run_dir / "model", v, 64)["ppl"] for k, v in texts.items()}
    return {"ppl_eval": ev["eval"], "ppl_docs": ev["docs"], "quant_wall_s": round(wall, 1),
            "calib_s": round(rep["calib_seconds"], 1), "peak_rss_mb": round(max(rep["peak_rss"].values()) / 2**20),
            "method": rep["config"]["method"], "steps": rep["config"]["steps"],
            "batch_size": rep["config"]["batch_size"], "loss": rep["config"]["loss"],
            "keep_best": rep["config"].get("keep_best"), "average_tail": rep["config"].get("average_tail"),
            "format": rep.get("format"),
            "evaluated": "written checkpoint (python -m pipeline.evaluate)", "command": shlex.join(cmd)}


def _last_error(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "error" in ln.lower():
            return ln[-300:]
    return lines[-1][-300:] if lines else "failed"


def table(results: Path) -> str:
    """Markdown table: one row per (budget, setting, row, seed), the last result of each."""
    rows: dict[tuple, dict] = {}
    for line in results.read_text().splitlines():
        r = json.loads(line)
        rows[(r["budget"], r["setting"], r["row"], r.get("seed"), r.get("steps_flag"), r.get("flags", ""))] = r
    out = ["| budget | setting | tool | seed | ppl eval.txt | ppl docs.txt | quant wall s | peak RSS MB | notes |",
           "|---|---|---|---|---|---|---|---|---|"]
    order = {s: i for i, s in enumerate(SETTINGS)}
    rank = {r: i for i, r in enumerate(ROWS)}
    for key in sorted(rows, key=lambda k: (k[0], order.get(k[1], -1), rank.get(k[2], 9), k[5], k[4] or 0, k[3] or 0)):
        r = rows[key]
        label = LABELS[r["row"]] + (f" `{r['flags']}`" if r.get("flags") else "")
        seed = "" if r.get("seed") is None else str(r["seed"])
        if "refused" in r:
            out.append(f"| {r['budget']} | {r['setting']} | {label} | {seed} | - | - | - | - | "
                       f"refused: {r['refused'].replace('|', '/')} |")
            continue
        note = r.get("evaluated", "")
        if r.get("method"):
            budget = f", {r['steps']} steps x {r['batch_size']}, loss {r['loss']}" if r.get("steps") else ""
            if r.get("average_tail"):
                budget += f", mean of the last {100 * r['average_tail']:g} % of steps"
            elif r.get("keep_best") is not None:
                budget += ", best step kept" if r["keep_best"] else ", last step kept"
            note = f"method {r['method']}{budget}; {note}"
        out.append(f"| {r['budget']} | {r['setting']} | {label} | {seed} | {r['ppl_eval']:.2f} | "
                   f"{r['ppl_docs']:.2f} | {r.get('quant_wall_s', '')} | {r.get('peak_rss_mb', '')} | {note} |")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fixtures", default="fixtures")
    p.add_argument("--out", default="bench_out/peers")
    p.add_argument("--settings", nargs="+", default=["w2g64", "w3g64", "w4g64"], choices=list(SETTINGS))
    p.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, choices=ROWS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds of the 'ours' row")
    p.add_argument("--steps", type=int, nargs="+", default=None,
                   help="optimizer steps per block of the 'ours' row, one row each (default: the method's)")
    p.add_argument("--flags", default="", help="more pipeline.quantize flags for the 'ours' rows (a variant, "
                   "shown in the table), e.g. --flags='--loss mse'")
    p.add_argument("--budget", default="32x512", help="calibration NSAMPLESxSEQLEN for every tool")
    p.add_argument("--threads", type=int, default=2, help="threads for every tool")
    p.add_argument("--table", action="store_true", help="only print the table of OUT/results.jsonl")
    a = p.parse_args()
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    if a.table:
        print(table(results))
        return 0
    nsamples, seqlen = (int(x) for x in a.budget.lower().split("x"))
    model, calib, eval_txt, docs_txt = (x.resolve() for x in ensure_fixtures(Path(a.fixtures)))
    texts = {"eval": eval_txt, "docs": docs_txt}
    tag = a.budget
    data = out / f"data-{tag}.pt"
    write_data(data, model, calib, texts, nsamples, seqlen, 64)
    t_start = time.perf_counter()
    for setting in a.settings:
        for row in a.rows:
            if row == "fp" and setting != a.settings[0]:
                continue
            runs = [(s, n) for n in (a.steps or [None]) for s in a.seeds] if row in ("ours", *VARIANTS) else [(None, None)]
            for seed, steps in runs:
                t0 = time.perf_counter()
                if row == "fp":
                    r = {k: evaluate(model, v, 64)["ppl"] for k, v in texts.items()}
                    r = {"ppl_eval": r["eval"], "ppl_docs": r["docs"], "evaluated": "source checkpoint"}
                elif row in OURS:
                    r = run_ours(out, row, setting, seed or 0, model, calib, texts, nsamples, seqlen, a.threads, tag,
                                 steps, shlex.split(a.flags))
                else:
                    r = run_peer(out, row, setting, model, data, a.threads, tag)
                r = {"budget": a.budget, "setting": "-" if row == "fp" else setting, "row": row, "seed": seed,
                     "steps_flag": steps, **({"flags": a.flags} if a.flags and row in OURS else {}), **r}
                with results.open("a") as f:
                    f.write(json.dumps(r) + "\n")
                print(json.dumps({k: v for k, v in r.items() if k != "command"}),
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"\nbench_peers wall time: {time.perf_counter() - t_start:.0f} s\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
