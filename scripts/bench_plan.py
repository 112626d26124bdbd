"""Check pipeline.plan's memory and time model against real block calibrations on this machine.

Measures this machine's throughputs first (fp32 matmul TFLOP/s, memory bandwidth, float64 SVD
TFLOP/s), then calibrates a random Llama block with the real calibrator (pipeline.calibrator,
in-process, one worker) for several settings, each in a fresh process, and compares:
- memory: the process's peak RSS during the block (reset just before it, block tensors and caches
  already held) plus the block weights, against the plan's per-worker peak. The runs set glibc's
  MALLOC_MMAP_THRESHOLD_ so that freed tensors go back to the OS: RSS then follows the live
  tensors, as torch.cuda.max_memory_allocated does on a GPU, instead of glibc's retained heap;
- time: the block's wall seconds (a second run, default allocator) against the plan's block_s
  computed with the measured throughputs.

    python scripts/bench_plan.py                                  # hidden 1024, 16 x 256 tokens, 1 epoch
    python scripts/bench_plan.py --hidden 1536 --out bench_out/plan
    python scripts/bench_plan.py --only gptq gptq-f32 --out bench_out/plan-gptq
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from lsiq.config import CalibConfig  # noqa: E402

SETTINGS = [  # (variant, batch_size, recompute); a variant is a method or method+option
    ("lsi", 1, False),
    ("lsi", 4, False),
    ("lsi", 4, True),
    ("lsi-full", 4, False),  # LSI's SVDs through LAPACK's SVD instead of the Gram route (--svd full)
    ("lwc-let", 4, False),
    ("gptq", 4, False),
    ("oac", 4, False),
    ("lsi+cross", 4, False),
    ("lsi+qera16", 4, False),
    ("gptq-f32", 4, False),
    ("lsi+qera16-f32", 4, False),
    ("rtn+qera16", 4, False),  # no training: the peak is the correction's solves
    ("rtn+qera16-f32", 4, False),
]
VARIANTS = {"lsi-full": ("lsi", {"svd": "full"}),
            "lsi+cross": ("lsi", {"cross_layer": True}), "lsi+qera16": ("lsi", {"lowrank": "qera", "rank": 16}),
            "gptq-f32": ("gptq", {"solve_dtype": "float32"}),
            "lsi+qera16-f32": ("lsi", {"lowrank": "qera", "rank": 16, "solve_dtype": "float32"}),
            "rtn+qera16": ("rtn", {"lowrank": "qera", "rank": 16}),
            "rtn+qera16-f32": ("rtn", {"lowrank": "qera", "rank": 16, "solve_dtype": "float32"})}


def calib_config(variant: str, **kw) -> CalibConfig:
    """The variant's CalibConfig; solves in float64 (what auto is on this CPU) unless it says float32,
    stated so that the plan (whose default is a GPU's float32) plans what runs."""
    method, extra = VARIANTS.get(variant, (variant, {}))
    return CalibConfig(method=method, **{"solve_dtype": "float64", **extra}, **kw)


def rss(field: str) -> int:
    """This process's /proc/self/status ``field`` (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def measured_env() -> dict[str, str]:
    """A measured child's environment: glibc's mmap threshold lowered so that freed tensors leave
    RSS (it then follows the live tensors, as torch.cuda.max_memory_allocated does on a GPU)."""
    return {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def measure_hardware(threads: int) -> dict[str, float]:
    """Sustained fp32 and float64 matmul TFLOP/s, memory GB/s and float64 SVD TFLOP/s (the plan's
    formula) here."""
    from bench_gpu import gptq_column, timed  # median of repeats after a warm-up (this VM's clock bursts)

    torch.set_num_threads(threads)
    cpu = torch.device("cpu")

    def best(fn, reps: int = 7) -> float:
        return timed(fn, cpu, reps)

    a, b = torch.randn(1024, 1024), torch.randn(1024, 2816)  # a 4 x 256-token micro-batch through an MLP linear
    tflops = 2 * 1024 * 1024 * 2816 / best(lambda: a @ b) / 1e12
    x = torch.randn(64 * 2**20)  # 256 MB
    y = torch.empty_like(x)
    mem_gbs = 2 * x.numel() * 4 / best(lambda: y.copy_(x)) / 1e9
    w = torch.randn(2816, 1024, dtype=torch.float64)
    m, r = 2816, 1024
    svd_tflops = (6 * m * r * r + 20 * r**3) / best(lambda: torch.linalg.svd(w, full_matrices=False), 2) / 1e12
    gram = w.T @ w
    eigh_tflops = 9 * r**3 / best(lambda: torch.linalg.eigh(gram), 2) / 1e12  # --svd gram's eigensolver
    a64, b64 = a.double(), b.double()
    fp64_tflops = 2 * 1024 * 1024 * 2816 / best(lambda: a64 @ b64) / 1e12
    column = gptq_column(cpu, tflops, n=1024)["gptq_column_us"]  # beyond its FLOPs (float32, as on a GPU)
    return {"tflops": tflops, "mem_gbs": mem_gbs, "svd_tflops": svd_tflops, "eigh_tflops": eigh_tflops,
            "fp64_tflops": fp64_tflops, "gptq_column_us": column}


def one(args: argparse.Namespace, method: str, batch: int, recompute: bool) -> dict:
    """Calibrate one random block in this process; peak RSS reset right before it."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from pipeline.calibrator import BlockCalibrator

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 256,
                         num_hidden_layers=1, vocab_size=256)
    tensors = {k: v.detach().clone() for k, v in LlamaDecoderLayer(config, 0).state_dict().items()}
    cfg = calib_config(method, wbits=4, group_size=128, epochs=args.epochs, batch_size=batch,
                       recompute_weights=recompute)
    cal = BlockCalibrator(config.to_dict(), cfg, "cpu", args.threads)
    # cross-layer: block 1's tensors, as the DAG hands them (held before the measurement, as block 0's are)
    next_tensors = ({k: v.detach().clone() for k, v in LlamaDecoderLayer(config, 1).state_dict().items()}
                    if cfg.cross_layer else None)
    hidden = torch.randn(args.nsamples, args.seqlen, args.hidden)
    pos = torch.arange(args.seqlen)[None]
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    kwargs = {"position_embeddings": LlamaRotaryEmbedding(config)(hidden, pos), "position_ids": pos}
    cal.set_inputs((hidden, kwargs))
    if cfg.method == "oac":  # what the OAC pass leaves for block 0: dL/d(its output) for every sample
        cal.oac_g[0] = torch.randn_like(hidden) * 1e-3
    del hidden
    meta = {"fingerprint": "", "bytes_read": 0, "read_seconds": 0.0, "peak_rss_reader": 0}
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (the peak) to the current RSS
    before = rss("VmRSS")
    t0 = time.perf_counter()
    out = cal.calibrate(0, tensors, meta, next_tensors)
    seconds = time.perf_counter() - t0
    peak = rss("VmHWM")
    weights = sum(v.numel() * v.element_size() for v in tensors.values()) * (2 if next_tensors else 1)
    return {"method": method, "batch": batch, "recompute": recompute, "seconds": seconds,
            "measured_bytes": peak - before + weights, "loss_after": out["stats"]["loss_after"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench_out/plan")
    p.add_argument("--only", nargs="+", default=None, choices=sorted({s[0] for s in SETTINGS}), metavar="VARIANT",
                   help="run only these variants' rows")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: method,batch,recompute
    args = p.parse_args()
    if args.one:
        method, batch, rec = args.one.split(",")
        print(json.dumps(one(args, method, int(batch), rec == "1")))
        return 0

    from lsiq.arch import BlockArch
    from pipeline import plan

    hw = measure_hardware(args.threads)
    print(f"this machine: {hw['tflops']:.3f} TFLOP/s fp32 matmul, {hw['fp64_tflops']:.3f} float64, "
          f"{hw['mem_gbs']:.1f} GB/s copy, {hw['svd_tflops']:.4f} TFLOP/s float64 SVD, "
          f"{hw['eigh_tflops']:.4f} eigensolver, "
          f"GPTQ {hw['gptq_column_us']:.0f} us per column", flush=True)
    arch = BlockArch("llama", args.hidden, args.intermediate, args.hidden // 64, args.hidden // 256, 64, 1)
    rows = []
    for method, batch, rec in SETTINGS:
        if args.only and method not in args.only:
            continue
        cmd = [sys.executable, __file__, "--one", f"{method},{batch},{int(rec)}", "--hidden", str(args.hidden),
               "--intermediate", str(args.intermediate), "--nsamples", str(args.nsamples), "--seqlen",
               str(args.seqlen), "--epochs", str(args.epochs), "--threads", str(args.threads)]
        # memory with mmap'd allocations (slower: every allocation faults in fresh pages), time without
        env = measured_env()
        runs = [json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, env=e).stdout
                           .strip().splitlines()[-1]) for e in (env, dict(os.environ))]
        got = {**runs[1], "measured_bytes": runs[0]["measured_bytes"]}
        cfg = calib_config(method, wbits=4, group_size=128, epochs=args.epochs, batch_size=batch)
        pc = plan.PlanConfig(arch=arch, gpus=1, gpu_mem=10**12, calib=cfg, nsamples=args.nsamples,
                             seqlen=args.seqlen,
                             hw=plan.Hardware(tflops=hw["tflops"], bf16_tflops=hw["tflops"], mem_gbs=hw["mem_gbs"],
                                              svd_tflops=hw["svd_tflops"], eigh_tflops=hw["eigh_tflops"],
                                              fp64_tflops=hw["fp64_tflops"],
                                              link_gbps=10.0, svd_bytes=8, gptq_column_us=hw["gptq_column_us"],
                                              gqa_scores=False))  # this CPU's SDPA holds no scores
        mem, t = plan.memory_plan(pc, rec), plan.time_plan(pc, rec)
        row = {**got, "predicted_bytes": mem["peak"], "predicted_seconds": t["block_s"], "predicted_time": t,
               "memory_ratio": got["measured_bytes"] / mem["peak"], "time_ratio": got["seconds"] / t["block_s"]}
        rows.append(row)
        print(f"{method:10s} batch {batch} recompute {'on ' if rec else 'off'}: memory {got['measured_bytes'] / 1e6:7.0f} MB "
              f"measured vs {mem['peak'] / 1e6:7.0f} MB planned ({row['memory_ratio']:.2f}); time {got['seconds']:6.1f} s "
              f"vs {t['block_s']:6.1f} s ({row['time_ratio']:.2f})", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan_check.json").write_text(json.dumps({"hardware": hw, "args": vars(args), "rows": rows}, indent=2))
    print(f"wrote {out / 'plan_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
