"""Calibrate real-size blocks on a GPU and check pipeline.plan's memory and time model against them.

1. Measures this GPU's throughputs: float32, bfloat16 and float64 matmuls, copy bandwidth, and the
   float32 SVD (torch.linalg.svd, what lsiq.lsi runs on a GPU) at each of the block's linear shapes.
2. Calibrates one random block of ``--model-config`` (default: Llama-2-70B's) with the real
   calibrator (pipeline.calibrator.BlockCalibrator on ``cuda``: FP targets, calibration, the next
   block's inputs), one worker holding ``--nsamples`` x ``--seqlen`` tokens in host RAM, as one of 8
   workers does with 128 x 2048. One fresh process per setting, each under ``--setting-timeout``.
   Compares torch.cuda.max_memory_allocated and the wall seconds with the plan computed from the
   measured throughputs (pipeline.plan.memory_plan / time_plan, one worker).
3. ``--dp``: two calibrator processes sharing the GPU, data-parallel through torch.distributed
   (``--dp-backend nccl`` refuses two ranks on one GPU, so gloo by default; it takes CUDA tensors
   through the host), against one worker on the same samples: how far the results differ.

    python scripts/bench_gpu.py --out bench_out/gpu                       # all settings, 70B block
    python scripts/bench_gpu.py --only lsi lsi-bf16 --epochs 1 --nsamples 8
    python scripts/bench_gpu.py --only lsi-bf16-recompute --epochs 5 --batch-size 4 --phases   # by phase
    python scripts/bench_gpu.py --skip-hardware --only lsi-bf16-recompute --epochs 5 --batch-size 4 --profile 25
    python scripts/bench_gpu.py --device cpu --model-config clusters/models/llama-3-8b/config.json \
        --hidden 256 --intermediate 512 --nsamples 4 --seqlen 64 --dp     # a smoke run without a GPU

Writes ``gpu_check.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from lsiq.config import CalibConfig  # noqa: E402

# variant: (method, CalibConfig fields); solves in float32, what auto is on a GPU and what the plan plans
VARIANTS = {"lsi": ("lsi", {}), "lsi-bf16": ("lsi", {"precision": "bf16"}),
            "lsi-recompute": ("lsi", {"recompute_weights": True}),
            "lsi-bf16-recompute": ("lsi", {"precision": "bf16", "recompute_weights": True}), "gptq": ("gptq", {}),
            "lsi+qera16": ("lsi", {"lowrank": "qera", "rank": 16}),
            "lsi+qera16-bf16": ("lsi", {"lowrank": "qera", "rank": 16, "precision": "bf16"})}
DEFAULT_VARIANTS = ["lsi", "lsi-bf16", "gptq", "lsi+qera16-bf16"]


def calib_config(variant: str, args: argparse.Namespace) -> CalibConfig:
    method, extra = VARIANTS[variant]
    return CalibConfig(method=method, wbits=4, group_size=128, epochs=args.epochs, batch_size=args.batch_size,
                       solve_dtype="float32", svd=args.svd, **extra)


def model_config(args: argparse.Namespace) -> dict:
    """The config.json's dict, with --hidden/--intermediate/--layers overrides (smaller smoke runs)."""
    data = json.loads(Path(args.model_config).read_text())
    if args.hidden:
        data.update(hidden_size=args.hidden, num_attention_heads=args.hidden // 64,
                    num_key_value_heads=max(1, args.hidden // 512))
    if args.intermediate:
        data["intermediate_size"] = args.intermediate
    data.pop("torch_dtype", None)
    return data


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, reps: int = 5) -> float:
    """Median seconds of ``fn`` after one warm-up."""
    fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def measure_hardware(device: torch.device, shapes: dict[str, tuple[int, int]]) -> dict:
    """The plan's Hardware fields measured here (its svd_tflops: the SVD of the block's largest
    linear, by lsiq.lsi.svd_flops; its eigh_tflops: the eigensolver on that linear's Gram matrix),
    and every linear shape's SVD rate, full and through the Gram matrix (--svd gram)."""
    from lsiq.lsi import svd_dtype, svd_factors, svd_flops

    n = 8192 if device.type == "cuda" else 1024
    out = {}
    for name, dtype in (("tflops", torch.float32), ("bf16_tflops", torch.bfloat16), ("fp64_tflops", torch.float64)):
        k = n if dtype != torch.float64 else n // 2
        a, b = torch.randn(k, k, device=device, dtype=dtype), torch.randn(k, k, device=device, dtype=dtype)
        out[name] = 2 * k**3 / timed(lambda a=a, b=b: a @ b, device) / 1e12
        del a, b
    x = torch.randn(256 * 2**20 if device.type == "cuda" else 16 * 2**20, device=device)
    y = torch.empty_like(x)
    out["mem_gbs"] = 2 * x.numel() * 4 / timed(lambda x=x, y=y: y.copy_(x), device) / 1e9
    del x, y
    svd = {}
    for m, k in sorted(set(shapes.values())):
        w = torch.randn(m, k, device=device, dtype=svd_dtype(device))
        s = timed(lambda w=w: torch.linalg.svd(w, full_matrices=False), device, reps=1)
        g = timed(lambda w=w: svd_factors(w, "gram", w.dtype), device, reps=1)
        svd[f"{m}x{k}"] = {"seconds": s, "tflops": svd_flops(m, k) / s / 1e12, "gram_seconds": g,
                           "gram_speedup": s / g}
        del w
    out.update(gptq_column(device, out["tflops"]))
    largest = max(shapes.values(), key=lambda s: s[0] * s[1])
    out["svd_tflops"] = svd[f"{largest[0]}x{largest[1]}"]["tflops"]
    k = min(largest)
    a = torch.randn(k, k, device=device, dtype=svd_dtype(device))
    g = a @ a.T
    out["eigh_tflops"] = svd_flops(k, k, "gram") / timed(lambda g=g: torch.linalg.eigh(g), device, reps=1) / 1e12
    del a, g
    out["svd_by_shape"] = svd
    return out


def gptq_column(device: torch.device, tflops: float, n: int = 4096) -> dict:
    """Seconds per input column of lsiq.gptq.gptq_quantize beyond its FLOPs (m n^2 + 2 n^3 at the
    float32 matmul rate): its column loop launches a dozen small kernels per column."""
    from lsiq.gptq import gptq_quantize
    from lsiq.quantizer import QuantSpec

    x = torch.randn(4 * n, n, device=device)
    h = x.T @ x / x.shape[0]
    w = torch.randn(n, n, device=device)
    s = timed(lambda: gptq_quantize(w, h, QuantSpec(4, 128)), device, reps=3)
    return {"gptq_seconds_4096": s, "gptq_column_us": max(0.0, s - (n**3 + 2 * n**3) / (tflops * 1e12)) / n * 1e6}


def random_block(config, index: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A freshly initialised decoder layer's tensors, on the host (as the reader hands them over)."""
    from pipeline.model_io import decoder_layer_class

    with torch.device(device):  # initialised where it is fast; the calibrator gets host tensors
        layer = decoder_layer_class(config)(config, index)
    return {k: v.detach().cpu() for k, v in layer.state_dict().items()}


def layer_inputs(config, n: int, seqlen: int) -> tuple[torch.Tensor, dict]:
    """Random hidden states and the block's keyword inputs (rotary embeddings, positions), on the host."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hidden = torch.randn(n, seqlen, config.hidden_size, generator=torch.Generator().manual_seed(1))
    pos = torch.arange(seqlen)[None]
    return hidden, {"position_embeddings": LlamaRotaryEmbedding(config)(hidden[:1], pos), "position_ids": pos}


class PhasePeaks:
    """Peak GPU allocation and seconds by phase of a block's calibration: wraps the calibrator's
    steps (FP targets and next inputs: forward_all; the losses before and after: mean_loss; the
    SVDs and LET set-up: BlockQuantizer; the low-rank solves: add_lowrank; building the layer on the
    device: _layer; packing the block for storage: block_tensors; unpacking it for the next inputs:
    _params; GPTQ's Hessians and solves: _gptq; the trained weights' quantization: finalize); what
    lies between them after the first loss is the training loop's. Seconds are taken between device
    synchronisations, so they hold on a GPU too (run without --profile for them: it slows every op);
    memory is read on a GPU only."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peaks, self.seconds, self.current = device, {}, {}, "other"
        self.reserved = 0
        self.since = time.perf_counter()

    def _close(self, phase: str | None = None) -> None:
        """The peak and the seconds since the last reset go to ``phase`` (default: the current one)."""
        phase = phase or self.current
        sync(self.device)
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self.since
        self.since = now
        if self.device.type == "cuda":
            self.peaks[phase] = max(self.peaks.get(phase, 0), torch.cuda.max_memory_allocated(self.device))
            self.reserved = max(self.reserved, torch.cuda.max_memory_reserved(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)

    def wrap(self, owner, attr: str, phase: str) -> None:
        fn = getattr(owner, attr)

        def wrapped(*a, **k):
            outer = self.current
            self._close(outer)
            self.current = phase
            try:
                return fn(*a, **k)
            finally:
                self._close()
                self.current = "training" if outer == "other" and phase in ("loss", "setup") else outer

        setattr(owner, attr, wrapped)


def top_ops(prof: torch.profiler.profile, device: torch.device, n: int) -> list[dict]:
    """The ``n`` ops with the most own time (on the GPU where there is one), in seconds."""
    # torch < 2.4 names the GPU's own time self_cuda_time_total
    keys = ("self_device_time_total", "self_cuda_time_total") if device.type == "cuda" else ("self_cpu_time_total",)

    def own_us(e) -> float:
        return next(getattr(e, k) for k in keys if hasattr(e, k))

    events = sorted(prof.key_averages(), key=own_us, reverse=True)[:n]
    return [{"op": e.key, "calls": e.count, "self_s": own_us(e) / 1e6} for e in events]


def one(args: argparse.Namespace, variant: str) -> dict:
    """Calibrate one block in this process; the GPU's peak allocation reset right before it."""
    from transformers import AutoConfig

    from pipeline.calibrator import BlockCalibrator

    device = torch.device(args.device)
    torch.manual_seed(0)
    data = model_config(args)
    config = AutoConfig.for_model(**data)
    tensors = random_block(config, 0, device)
    hidden, kwargs = layer_inputs(config, args.nsamples, args.seqlen)
    cfg = calib_config(variant, args)
    cal = BlockCalibrator(data, cfg, args.device)
    cal.set_inputs((hidden, kwargs))
    del hidden
    meta = {"fingerprint": "", "bytes_read": 0, "read_seconds": 0.0, "peak_rss_reader": 0}
    phases = None
    if args.phases:
        import lsiq.block
        import lsiq.methods.gptq
        import lsiq.methods.oac
        import lsiq.trainable
        import pipeline.calibrator
        import pipeline.formats

        phases = PhasePeaks(device)
        phases.wrap(pipeline.calibrator, "forward_all", "forward_all")
        phases.wrap(lsiq.block, "mean_loss", "loss")
        phases.wrap(lsiq.trainable.BlockQuantizer, "__init__", "setup")
        phases.wrap(lsiq.block, "add_lowrank", "lowrank")
        phases.wrap(BlockCalibrator, "_layer", "layer")
        phases.wrap(pipeline.formats, "block_tensors", "pack")
        phases.wrap(BlockCalibrator, "_params", "unpack")
        phases.wrap(lsiq.methods.gptq, "input_autocorrelations", "gptq")  # GPTQ's Hessian pass
        phases.wrap(lsiq.methods.gptq, "gptq_linears", "gptq")  # GPTQ's and OAC's solves
        phases.wrap(lsiq.methods.oac, "gptq_linears", "gptq")
        phases.wrap(lsiq.trainable.BlockQuantizer, "finalize", "finalize")
    sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    profiler = contextlib.nullcontext()
    if args.profile:  # the ops' own time, on the device where there is one (the wall seconds include its overhead)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        profiler = torch.profiler.profile(activities=activities)
    t0 = time.perf_counter()
    if phases is not None:
        phases.since = t0
    with profiler:
        out = cal.calibrate(0, tensors, meta)
        sync(device)
        seconds = time.perf_counter() - t0  # before the profiler stops (its flush is not the block's time)
        if phases is not None:
            phases._close()
    row = {"variant": variant, "seconds": seconds, "calib_seconds": out["stats"]["calib_seconds"],
           "loss_before": out["stats"]["loss_before"], "loss_after": out["stats"]["loss_after"]}
    if phases is not None:
        row["phase_seconds"] = phases.seconds
    if args.profile:
        row["profile"] = top_ops(profiler, device, args.profile)
    if device.type == "cuda":
        row["measured_bytes"] = torch.cuda.max_memory_allocated(device) - before
        row["reserved_bytes"] = torch.cuda.max_memory_reserved(device)
        if phases is not None:  # it reset the peaks at every phase: its own maxima hold the run's
            row["reserved_bytes"] = phases.reserved
            row["measured_bytes"] = max(phases.peaks.values()) - before
            row["phase_bytes"] = {k: v - before for k, v in phases.peaks.items()}
    return row


def planned(args: argparse.Namespace, variant: str, hw: dict) -> dict:
    """pipeline.plan's memory and time for ``variant`` on one worker, with the measured throughputs."""
    from transformers import AutoConfig

    from lsiq.arch import BlockArch
    from pipeline import plan

    arch = BlockArch.from_config(AutoConfig.for_model(**model_config(args)))
    cfg = calib_config(variant, args)
    fields = {k: hw[k] for k in ("tflops", "bf16_tflops", "mem_gbs", "svd_tflops", "fp64_tflops", "gptq_column_us")}
    # results measured before --svd gram have no eigensolver rate: the SVD's stands in for it
    fields["eigh_tflops"] = hw.get("eigh_tflops", hw["svd_tflops"])
    pc = plan.PlanConfig(arch=arch, gpus=1, gpu_mem=10**13, calib=cfg, nsamples=args.nsamples, seqlen=args.seqlen,
                         hw=plan.Hardware(**fields, link_gbps=args.link_gbps, svd_bytes=8 if args.device == "cpu" else 4,
                                          gqa_scores=args.device.startswith("cuda")),
                         recompute="on" if cfg.recompute_weights else "off")
    return plan.make_plan(pc)


# ----------------------------------------------------------------------------- data parallel


def _dp_worker(rank: int, world: int, args: argparse.Namespace, port: int, result_dir: str) -> None:
    from transformers import AutoConfig

    from lsiq.parallel import shard_range
    from pipeline.calibrator import BlockCalibrator

    torch.manual_seed(0)
    data = model_config(args)
    config = AutoConfig.for_model(**data)
    device = torch.device(args.device)
    tensors = random_block(config, 0, torch.device("cpu"))
    hidden, kwargs = layer_inputs(config, args.nsamples, args.seqlen)
    owned = shard_range(args.nsamples, world, rank)
    cfg = calib_config(args.dp_variant, args)
    cal = BlockCalibrator(data, cfg, args.device, rank=rank, world=world, owned=owned, total=args.nsamples)
    if world > 1:
        cal.join_group("127.0.0.1", port, 300.0, backend=args.dp_backend)
    cal.set_inputs((hidden[owned], kwargs))
    meta = {"fingerprint": "", "bytes_read": 0, "read_seconds": 0.0, "peak_rss_reader": 0}
    sync(device)
    t0 = time.perf_counter()
    out = cal.calibrate(0, tensors, meta)
    sync(device)
    seconds = time.perf_counter() - t0
    # every worker's next-block inputs (its own samples) and rank 0's stored tensors
    torch.save({"tensors": out["tensors"], "next": cal.q_in, "owned": owned, "seconds": seconds,
                "loss_after": out["stats"]["loss_after"]}, os.path.join(result_dir, f"{world}-{rank}.pt"))


def data_parallel(args: argparse.Namespace) -> dict:
    """One worker, then two workers sharing the device: seconds and the largest differences."""
    import socket

    import torch.multiprocessing as mp

    result = {"variant": args.dp_variant, "backend": args.dp_backend}
    with tempfile.TemporaryDirectory() as tmp:
        for world in (1, 2):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            try:
                mp.spawn(_dp_worker, args=(world, args, port, tmp), nprocs=world, join=True)
            except Exception as e:  # noqa: BLE001 - reported, e.g. nccl refusing two ranks on one GPU
                result[f"error_{world}"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"
                return result
        one = torch.load(os.path.join(tmp, "1-0.pt"))
        two = [torch.load(os.path.join(tmp, f"2-{r}.pt")) for r in range(2)]
    diffs = {}
    for k, a in one["tensors"].items():
        b = two[0]["tensors"][k]
        if a.is_floating_point():
            diffs[k] = (a.float() - b.float()).abs().max().item()
        else:
            diffs[k] = (a != b).float().mean().item()  # share of differing codes
    next_one = torch.cat([one["next"][two[r]["owned"]] for r in range(2)])
    next_two = torch.cat([two[r]["next"] for r in range(2)])
    result.update(seconds_1=one["seconds"], seconds_2=max(t["seconds"] for t in two),
                  loss_after_1=one["loss_after"], loss_after_2=two[0]["loss_after"],
                  max_float_diff=max((v for k, v in diffs.items() if one["tensors"][k].is_floating_point()), default=0.0),
                  max_code_mismatch=max((v for k, v in diffs.items() if not one["tensors"][k].is_floating_point()),
                                        default=0.0),
                  next_inputs_max_diff=(next_one - next_two).abs().max().item(),
                  next_inputs_scale=next_one.abs().max().item())
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-config", default=str(ROOT / "clusters" / "models" / "llama-2-70b" / "config.json"))
    p.add_argument("--hidden", type=int, default=0, help="override hidden_size (heads follow at 64 per head)")
    p.add_argument("--intermediate", type=int, default=0, help="override intermediate_size")
    p.add_argument("--nsamples", type=int, default=16, help="samples this worker holds (one of 8 workers of 128)")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=1, help="samples per optimizer step (8 workers x 1 = 8)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--svd", default="gram", choices=["gram", "full"], help="LSI's SVD route (pipeline.quantize --svd)")
    p.add_argument("--only", nargs="+", default=DEFAULT_VARIANTS, choices=sorted(VARIANTS), metavar="VARIANT",
                   help=f"settings to run, of {', '.join(VARIANTS)} (default: {' '.join(DEFAULT_VARIANTS)})")
    p.add_argument("--setting-timeout", type=int, default=300, help="seconds allowed to one setting's process")
    p.add_argument("--phases", action="store_true",
                   help="also the seconds (and on a GPU the peak allocation) of each phase of the block")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also the N ops with the most own time in the block's calibration (torch.profiler)")
    p.add_argument("--skip-hardware", action="store_true", help="reuse gpu_check.json's throughputs under --out")
    p.add_argument("--dp", action="store_true", help="also the two-worker data-parallel check")
    p.add_argument("--dp-backend", default="gloo", choices=["gloo", "nccl"])
    p.add_argument("--dp-variant", default="lsi", choices=sorted(VARIANTS))
    p.add_argument("--link-gbps", type=float, default=10.0, help="for the plan's all-reduce time")
    p.add_argument("--out", default=str(ROOT / "bench_out" / "gpu"))
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one variant in this process
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.one:
        print(json.dumps(one(args, args.one)))
        return 0

    from transformers import AutoConfig

    from lsiq.arch import BlockArch

    device = torch.device(args.device)
    report_path = out / "gpu_check.json"
    report = json.loads(report_path.read_text()) if args.skip_hardware and report_path.exists() else {}
    report["args"] = vars(args)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        report["device"] = {"name": props.name, "memory_bytes": props.total_memory, "torch": torch.__version__,
                            "cuda": torch.version.cuda}
        print(f"device: {props.name}, {props.total_memory / 2**30:.1f} GiB, torch {torch.__version__}", flush=True)
    arch = BlockArch.from_config(AutoConfig.for_model(**model_config(args)))
    if "hardware" not in report:
        report["hardware"] = measure_hardware(device, arch.linear_shapes())
    hw = report["hardware"]
    if "gptq_column_us" not in hw:
        hw.update(gptq_column(device, hw["tflops"]))
    print(f"GPTQ: {hw['gptq_column_us']:.0f} us per column beyond its FLOPs", flush=True)
    print(f"throughputs: {hw['tflops']:.1f} TFLOP/s fp32, {hw['bf16_tflops']:.1f} bf16, {hw['fp64_tflops']:.1f} fp64; "
          f"{hw['mem_gbs']:.0f} GB/s copy; SVD " + ", ".join(f"{k} {v['seconds']:.2f} s ({v['tflops']:.2f} TFLOP/s)"
                                                         for k, v in hw["svd_by_shape"].items()), flush=True)
    report_path.write_text(json.dumps(report, indent=2))
    rows = report.setdefault("rows", [])
    for variant in args.only:
        cmd = [sys.executable, __file__, "--one", variant, *_passthrough(args)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.setting_timeout)
        except subprocess.TimeoutExpired:
            rows.append({"variant": variant, "error": f"timed out after {args.setting_timeout} s"})
            print(f"{variant}: timed out after {args.setting_timeout} s", flush=True)
            continue
        if proc.returncode != 0:
            rows.append({"variant": variant, "error": proc.stderr.strip().splitlines()[-1][:500]})
            print(f"{variant}: failed\n{proc.stderr[-3000:]}", flush=True)
            continue
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        plan_ = planned(args, variant, hw)
        row = {**got, "predicted_bytes": plan_["per_worker_bytes"], "predicted_seconds": plan_["time"]["block_s"],
               "predicted_time": plan_["time"], "time_ratio": got["seconds"] / plan_["time"]["block_s"]}
        mem = ""
        if "measured_bytes" in got:
            row["memory_ratio"] = got["measured_bytes"] / plan_["per_worker_bytes"]
            mem = (f"memory {got['measured_bytes'] / 2**30:6.2f} GiB measured vs {plan_['per_worker_bytes'] / 2**30:6.2f} "
                   f"GiB planned ({row['memory_ratio']:.2f}); ")
        rows.append(row)
        if "phase_bytes" in got:
            print("  peak by phase: " + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in got["phase_bytes"].items()))
        if "profile" in got:
            print("  most own time: " + ", ".join(f"{e['op']} {e['self_s']:.2f} s ({e['calls']})" for e in got["profile"][:12]))
        if "phase_seconds" in got:
            t = plan_["time"]
            print("  seconds by phase: " + ", ".join(f"{k} {v:.2f}" for k, v in got["phase_seconds"].items())
                  + f"  (planned: SVD {t['svd_s']:.2f}, tokens {t['tokens_s']:.2f}, weight side {t['weight_s']:.2f},"
                    f" solves {t['solve_s']:.2f})")
        print(f"{variant:16s} {mem}time {got['seconds']:7.1f} s vs {plan_['time']['block_s']:7.1f} s planned "
              f"({row['time_ratio']:.2f}); loss {got['loss_before']:.3g} -> {got['loss_after']:.3g}", flush=True)
        report_path.write_text(json.dumps(report, indent=2))
    if args.dp:
        report["data_parallel"] = data_parallel(args)
        print("data parallel:", json.dumps(report["data_parallel"]), flush=True)
    report_path.write_text(json.dumps(report, indent=2))
    print(f"wrote {report_path}")
    return 0


def _passthrough(args: argparse.Namespace) -> list[str]:
    """The shape and size flags, for a setting's own process."""
    flags = ["--model-config", args.model_config, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
             "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--device", args.device,
             "--out", args.out, "--svd", args.svd, "--profile", str(args.profile)] + (["--phases"] if args.phases else [])
    if args.hidden:
        flags += ["--hidden", str(args.hidden)]
    if args.intermediate:
        flags += ["--intermediate", str(args.intermediate)]
    return flags


if __name__ == "__main__":
    sys.exit(main())
