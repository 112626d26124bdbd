"""Measure the transient memory of the closed-form solves and fit the planner's coefficients.

For GPTQ (``gptq_quantize`` and the codes, as ``lsiq.methods.gptq`` runs it) and each low-rank
correction (the error E and ``lowrank_correction``, as ``lsiq.lowrank.add_lowrank`` runs them), in
float64 and float32, each shape [m, n] runs in a fresh process: the weight, its quantized copy and
the [n, n] Hessian / autocorrelation are allocated first (the plan counts them as held), the
process's peak RSS is reset, and the solve's peak above that is its transient. glibc's mmap
threshold is lowered so that freed tensors go back to the OS (RSS follows the live tensors, as
torch.cuda.max_memory_allocated does on a GPU). A least-squares fit over the shapes gives
(n^2, m n, k^2) coefficients in bytes (k = min(m, n)): pipeline/plan.py's SOLVE_TRANSIENT and
LOWRANK_TRANSIENT.

    python scripts/fit_solve_memory.py                       # 9 shapes, 1024..4096, ~15 min on 2 cores
    python scripts/fit_solve_memory.py --kinds gptq qera --dtypes float32 --out bench_out/solve_memory
    python scripts/fit_solve_memory.py --refit                 # fit the saved rows again
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_plan import measured_env, rss  # noqa: E402  (scripts/ is this script's own directory)

KINDS = ("gptq", "qera", "lqer", "svd")
SIZES = (1024, 2048, 4096)


def one(kind: str, dtype_name: str, m: int, n: int, threads: int) -> int:
    """Peak bytes above the held inputs of one solve, in this process."""
    import torch

    from lsiq.gptq import gptq_quantize
    from lsiq.lowrank import lowrank_correction
    from lsiq.quantizer import QuantSpec, fake_quant, minmax_scale_zero, quantize_codes

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    spec = QuantSpec(4, 128)
    w = torch.randn(m, n)
    wq = fake_quant(w, *minmax_scale_zero(w, spec), spec)
    held = {}
    if kind != "svd":
        x = torch.randn(2 * n, n, dtype=dtype)
        held["h"] = x.T @ x / x.shape[0]
        del x
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (the peak) to the current RSS
    before = rss("VmRSS")
    if kind == "gptq":
        q, scale, zero = gptq_quantize(w, held.pop("h"), spec)
        codes = quantize_codes(q, scale, zero, spec)
        del q, codes
    else:  # E and R handed over without a reference kept, as add_lowrank does
        a, b = lowrank_correction(w.to(dtype) - wq.to(dtype), 16, kind, held.pop("h", None), 1e-6, dtype)
        a16, b16 = a.to(torch.float16), b.to(torch.float16)
        del a, b, a16, b16
    return rss("VmHWM") - before


def fit(rows: list[dict], kind: str) -> tuple[list[float], float]:
    """Least-squares (n^2, m n, k^2) coefficients and the worst relative error of the fit. GPTQ has
    no SVD, so no k^2 term (fitting one gives it a small negative weight)."""
    import torch

    a = torch.tensor([[r["n"] ** 2, r["m"] * r["n"], min(r["m"], r["n"]) ** 2] for r in rows], dtype=torch.float64)
    if kind == "gptq":
        a[:, 2] = 0
    y = torch.tensor([float(r["bytes"]) for r in rows], dtype=torch.float64)
    coef = torch.linalg.lstsq(a, y[:, None]).solution[:, 0].nan_to_num()
    worst = float(((a @ coef - y).abs() / y).max())
    return [round(float(c), 1) for c in coef], worst


def report(results: dict, key: str) -> None:
    kind = key.split("/")[0]
    coef, worst = fit(results[key]["rows"], kind)
    results[key].update(coef_n2_mn_k2=coef, worst_rel_error=round(worst, 4))
    print(f"{key}: transient = {coef[0]} n^2 + {coef[1]} m n + {coef[2]} k^2 bytes (fit within {worst:.1%})", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--dtypes", nargs="+", default=["float64", "float32"], choices=["float64", "float32"])
    p.add_argument("--sizes", nargs="+", type=int, default=list(SIZES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench_out/solve_memory")
    p.add_argument("--refit", action="store_true", help="fit again the rows in OUT/solve_memory.json, no runs")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: kind,dtype,m,n
    args = p.parse_args()
    if args.refit:
        path = Path(args.out) / "solve_memory.json"
        results = json.loads(path.read_text())
        for key in results:
            report(results, key)
        path.write_text(json.dumps(results, indent=1))
        return 0
    if args.one:
        kind, dtype, m, n = args.one.split(",")
        print(json.dumps({"bytes": one(kind, dtype, int(m), int(n), args.threads)}))
        return 0
    env = measured_env()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "solve_memory.json"
    results = json.loads(path.read_text()) if path.exists() else {}  # other kinds' earlier rows stay
    for kind, dtype in itertools.product(args.kinds, args.dtypes):
        rows = []
        for m, n in itertools.product(args.sizes, args.sizes):
            cmd = [sys.executable, __file__, "--one", f"{kind},{dtype},{m},{n}", "--threads", str(args.threads)]
            r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout.splitlines()[-1])
            rows.append({"m": m, "n": n, "bytes": r["bytes"]})
            print(f"{kind:5s} {dtype:8s} [{m:5d}, {n:5d}] {r['bytes'] / 2**20:9.1f} MiB", flush=True)
        results[f"{kind}/{dtype}"] = {"rows": rows}
        report(results, f"{kind}/{dtype}")
        path.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
