"""LSI's SVD two ways: LAPACK's/cuSOLVER's full SVD against the Gram route (``--svd gram``).

    python scripts/bench_svd.py                       # bench_out/svd/svd.json; CPU, float64 timings
    python scripts/bench_svd.py --device cuda --dtype float32 --shapes 8192x8192 8192x28672 28672x8192

Two parts, one run:
- accuracy on the real weights of one SmolLM2-135M block (the bundled model, written under
  --fixtures if missing), in float32 and float64: how far U and V are from orthonormal, S from
  float64's full SVD, U diag(S) V^T from W;
- seconds per linear shape (random weights, median of --reps after a warm-up), full against Gram,
  in --dtype on --device: the speed-up is measured within one run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_gpu import timed  # noqa: E402  - median of repeats after a warm-up, synchronised on a GPU

from lsiq.lsi import svd_dtype, svd_factors  # noqa: E402


def block_weights(fixtures: Path, layer: int) -> dict[str, torch.Tensor]:
    """The seven linear weights of SmolLM2's block ``layer``, float32."""
    from safetensors import safe_open

    from pipeline.fixtures import write_smollm2

    model = fixtures / "smollm2"
    if not (model / "model.safetensors.index.json").exists():
        write_smollm2(model)
    weights = {}
    for shard in sorted(model.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                if f".layers.{layer}." in key and key.endswith("_proj.weight"):
                    weights[key.split(f".layers.{layer}.")[1].removesuffix(".weight")] = f.get_tensor(key).float()
    return dict(sorted(weights.items()))


def accuracy(w: torch.Tensor, method: str, dtype: torch.dtype) -> dict[str, float]:
    """Orthogonality of U and V, S's error against float64's full SVD (relative to S_max), and the
    reconstruction error, all measured in float64."""
    _, s0, _ = torch.linalg.svd(w.double(), full_matrices=False)
    u, s, vh = (t.double() for t in svd_factors(w.to(dtype), method, dtype))
    eye = torch.eye(s.numel(), dtype=torch.float64)
    return {"orth_u": (u.T @ u - eye).abs().max().item(), "orth_v": (vh @ vh.T - eye).abs().max().item(),
            "s_err": ((s - s0).abs().max() / s0[0]).item(), "cond": (s0[0] / s0[-1]).item(),
            "recon": ((u * s) @ vh - w.double()).norm().item() / w.double().norm().item()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fixtures", default="fixtures", help="where the bundled model is (written if missing)")
    p.add_argument("--layer", type=int, default=5, help="SmolLM2 block whose weights the accuracy part uses")
    p.add_argument("--shapes", nargs="+", default=["576x576", "1536x576", "576x1536", "2048x2048", "5632x2048",
                                                   "2048x5632"], help="OUTxIN linear shapes to time")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "float64"],
                   help="timing dtype (default: what --svd-dtype auto picks: float64 on CPU, float32 on GPU)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench_out/svd")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else svd_dtype(device)

    rows = []
    print(f"accuracy, SmolLM2-135M block {args.layer} (|U^T U - I|, |V V^T - I|, |S - S64| / S_max, relative |USV^T - W|)")
    for name, w in block_weights(Path(args.fixtures), args.layer).items():
        for dt in (torch.float64, torch.float32):
            for method in ("full", "gram"):
                r = {"linear": name, "shape": list(w.shape), "dtype": str(dt).removeprefix("torch."), "method": method,
                     **accuracy(w, method, dt)}
                rows.append(r)
                print(f"  {name:16s} {r['dtype']:7s} {method:4s} cond {r['cond']:8.1e}  U {r['orth_u']:.1e}  "
                      f"V {r['orth_v']:.1e}  S {r['s_err']:.1e}  W {r['recon']:.1e}", flush=True)

    times = []
    print(f"seconds per SVD on {device} in {str(dtype).removeprefix('torch.')}, median of {args.reps}")
    for shape in args.shapes:
        m, n = (int(x) for x in shape.split("x"))
        w = torch.randn(m, n, device=device, dtype=dtype)
        full = timed(lambda w=w: svd_factors(w, "full", dtype), device, args.reps)
        gram = timed(lambda w=w: svd_factors(w, "gram", dtype), device, args.reps)
        times.append({"shape": [m, n], "full_s": full, "gram_s": gram, "speedup": full / gram})
        print(f"  {m:6d} x {n:<6d} full {full:8.3f} s  gram {gram:8.3f} s  x{full / gram:.2f}", flush=True)
        del w

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"device": str(device), "dtype": str(dtype), "torch": torch.__version__, "threads": args.threads,
              "accuracy": rows, "timing": times}
    (out / "svd.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out / 'svd.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
