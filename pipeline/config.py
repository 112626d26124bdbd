"""Run configuration: typed dataclasses with defaults, and the one place that parses the CLI."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any

from lsiq.block import METHODS, CalibConfig
from pipeline import formats


@dataclass
class QuantizeConfig:
    """Everything `python -m pipeline.quantize` needs."""

    model: str
    output: str
    calib: list[str]
    calib_cfg: CalibConfig = field(default_factory=CalibConfig)
    nsamples: int = 16
    seqlen: int = 256
    report: str | None = None
    address: str | None = None
    device: str = "auto"  # auto: the actor asks for a GPU when the cluster has one
    num_cpus: int | None = None  # CPUs for the calibrator actor (default: all of the local node's)
    restart: bool = False
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options for --model (and --output)
    output_storage_options: dict[str, Any] | None = None  # for --output, when it differs
    max_shard_bytes: int = 5 * 10**9  # a block larger than this is split over several shards
    activation_budget: int | None = None  # bytes of activation caches kept in RAM; above it they spill to disk
    spill_dir: str | None = None  # local directory for spilled caches (default: the temp dir)
    max_restarts: int = 3  # how often a dead calibrator is restarted before the run gives up
    workers: int = 1  # data-parallel calibrator workers, each holding a share of the samples
    gpus_per_worker: float | None = None  # default: 1 when the cluster has GPUs, else 0
    cpus_per_worker: int | None = None  # default: --num-cpus (or the node's CPUs) / workers
    # the longest a worker waits in one collective before the group is declared broken: also how
    # long survivors take to notice a dead worker, and a bound on one worker's lone SVD or solve
    collective_timeout: float = 120.0
    format: str | None = None  # output layout (pipeline.formats); None = formats.default_format

    def __post_init__(self) -> None:
        if self.collective_timeout <= 0:
            raise ValueError(f"--collective-timeout must be > 0 seconds, got {self.collective_timeout}")
        if self.format is None:
            self.format = formats.default_format(self.calib_cfg.wbits, self.calib_cfg.abits,
                                                 self.calib_cfg.lowrank is not None)
        formats.get(self.format)  # a clear error for an unknown name
        # the grid must be one the format can store (GPTQ v1: asymmetric zero points >= 1)
        need = formats.zero_min(self.format, self.calib_cfg.spec)
        if self.calib_cfg.zero_min < need:
            self.calib_cfg = dataclasses.replace(self.calib_cfg, zero_min=need)
        if self.nsamples < 1 or self.seqlen < 2:
            raise ValueError("--nsamples must be >= 1 and --seqlen >= 2")
        if not 1 <= self.workers <= self.nsamples:
            raise ValueError(f"--workers must be between 1 and --nsamples ({self.nsamples}): every worker needs a sample")

    @property
    def out_storage_options(self) -> dict[str, Any]:
        return self.storage_options if self.output_storage_options is None else self.output_storage_options


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """``"512MB"``, ``"2GiB"``, ``"1e9"`` -> bytes."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 512MB, 2GiB, 1000000)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_json_object(text: str) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return obj


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.quantize",
        description="Quantize a sharded safetensors decoder checkpoint block by block inside a Ray actor. "
        "Each block is calibrated on the inputs the already-quantized blocks produce, against the FP block's "
        "outputs; the model is never loaded whole.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    io = p.add_argument_group("input and output")
    io.add_argument("--model", required=True,
                    help="source checkpoint (config.json, *.safetensors): a path or any fsspec URL (s3://bucket/prefix, "
                    "gs://..., file://...); only one block's tensors are read at a time, as byte ranges")
    io.add_argument("--output", required=True, help="output location for the quantized checkpoint (path or fsspec URL)")
    io.add_argument("--storage-options", type=parse_json_object, default={}, metavar="JSON",
                    help='fsspec options for --model and --output, e.g. \'{"client_kwargs": {"endpoint_url": '
                    '"http://127.0.0.1:8333"}}\'; credentials come from the environment as s3fs/gcsfs read them '
                    "(AWS_ACCESS_KEY_ID, ...) or from here (never logged)")
    io.add_argument("--output-storage-options", type=parse_json_object, default=None, metavar="JSON",
                    help="fsspec options for --output when they differ from --storage-options")
    io.add_argument("--max-shard-size", type=parse_bytes, default="5GB",
                    help="largest output shard; a quantized block above it is split over several shards")
    io.add_argument("--format", choices=formats.FORMATS, default=None,
                    help="output layout. compressed-tensors: pack-quantized, 4 and 8 bits, weight-only (vLLM, and "
                    "transformers with the compressed-tensors package); gptq: GPTQ v1, 2/3/4/8 bits, weight-only "
                    "(vLLM, transformers with gptqmodel); native: ours, any setting incl. weight-activation, read by "
                    "python -m pipeline.evaluate. Default: compressed-tensors where the bit width allows, else gptq, "
                    "else native")
    io.add_argument("--calib", nargs="+", required=True, metavar="FILE", help="calibration text file(s)")
    io.add_argument("--report", default=None, help="JSON report path (a PNG plot is written beside it)")
    io.add_argument("--restart", action="store_true",
                    help="discard what the output holds (a finished run or the checkpoints of an unfinished one) and "
                    "start over; without it, rerunning the same command resumes after the last finished block")
    io.add_argument("--overwrite", dest="restart", action="store_true", help=argparse.SUPPRESS)  # old name
    q = p.add_argument_group("quantization")
    q.add_argument("--method", choices=METHODS, default="lsi",
                   help="rtn: round to nearest; gptq; lwc: OmniQuant weight clipping; lwc-let: + equivalent "
                   "transformation; lsi: + learnable singular-value increments; sde: lsi + learnable bands beside the "
                   "singular values' diagonal (--sde-band)")
    q.add_argument("--wbits", type=int, default=3, help="weight bits (2-8)")
    q.add_argument("--abits", type=int, default=16, choices=[4, 6, 8, 16],
                   help="activation bits, dynamic per token; 16 = weight-only")
    q.add_argument("--group-size", type=int, default=64, help="weight group size along the input dim; 0 = per channel")
    q.add_argument("--sym", action="store_true", help="symmetric weight grid (default asymmetric)")
    c = p.add_argument_group("calibration")
    c.add_argument("--nsamples", type=int, default=16, help="calibration sequences")
    c.add_argument("--seqlen", type=int, default=256, help="tokens per calibration sequence")
    c.add_argument("--epochs", type=int, default=5, help="passes over the calibration set per block")
    c.add_argument("--batch-size", type=int, default=CalibConfig.batch_size, help="sequences per optimizer step (micro-batch)")
    c.add_argument("--forward-batch-size", type=int, default=CalibConfig.forward_batch_size,
                   help="sequences per micro-batch of the passes that do not train (targets, losses, statistics, "
                        "next inputs), per worker; 0 = a worker's share of --batch-size. Lower it when those passes "
                        "set the memory peak (python -m pipeline.plan says when)")
    c.add_argument("--seed", type=int, default=0, help="seed for sampling and training")
    c.add_argument("--lr-lwc", type=float, default=CalibConfig.lr_lwc, help="learning rate of LWC bounds")
    c.add_argument("--lr-let", type=float, default=CalibConfig.lr_let, help="learning rate of LET scales")
    c.add_argument("--lr-lsi", type=float, default=CalibConfig.lr_lsi, help="learning rate of singular-value increments")
    c.add_argument("--lsi-block-k", type=int, default=0, help="learnable k x k top-left block of the singular values")
    c.add_argument("--sde-band", type=int, default=CalibConfig.sde_band,
                   help="SDE: learnable diagonals on each side of the singular-value diagonal (0 = LSI)")
    c.add_argument("--lr-sde", type=float, default=CalibConfig.lr_sde, help="learning rate of SDE's bands")
    c.add_argument("--lowrank", choices=["qera", "lqer", "svd"], default=None,
                   help="after a block's weights are quantized, give each linear a rank --rank correction A B in "
                   "float16, in closed form from the block's inputs: qera uses their autocorrelation (minimises the "
                   "output error), lqer its diagonal, svd ignores the inputs; stored in --format native only")
    c.add_argument("--rank", type=int, default=CalibConfig.rank, help="rank of --lowrank corrections")
    c.add_argument("--cross-layer", action="store_true",
                   help="cross-layer learning: block i's loss adds the error of block i+1 (full precision) fed with "
                   "block i's quantized output; each calibrator holds two blocks' FP tensors at a time")
    c.add_argument("--cross-layer-weight", type=float, default=CalibConfig.cross_layer_weight,
                   help="weight of the block i+1 term in --cross-layer")
    c.add_argument("--lsi-relative", action="store_true",
                   help="learn the increment relative to each singular value (dS = S * r): a scale-free learning rate")
    c.add_argument("--recompute-weights", action="store_true",
                   help="rebuild each linear's calibrated weight in the backward pass instead of keeping its "
                   "intermediates: ~5.5 block-weight sizes less memory per step with LSI for ~50%% more weight-side "
                   "compute (python -m pipeline.plan says when a model needs it)")
    c.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: the training steps run under bfloat16 autocast (GPU tensor cores; several times the "
                   "fp32 matmul rate); targets, statistics and the propagated activations stay fp32")
    c.add_argument("--solve-dtype", choices=["auto", "float64", "float32"], default="auto",
                   help="dtype of GPTQ's and OAC's Hessians, --lowrank's autocorrelations and their solves; auto = "
                   "float64 on CPU, float32 on GPU (half the memory of the [in, in] matrices; float64 is slow on GPUs)")
    c.add_argument("--svd", choices=["gram", "full"], default="gram",
                   help="how LSI/SDE take each linear's SVD: gram = from the eigenvectors of the smaller Gram matrix "
                   "(2.9-4.5x less of the slow factorisation work on Llama shapes; in float32 the directions of small singular "
                   "values lose some orthogonality), full = LAPACK's/cuSOLVER's SVD")
    c.add_argument("--svd-dtype", choices=["auto", "float64", "float32"], default="auto",
                   help="dtype of LSI's SVDs; auto = float64 on CPU, float32 on GPU")
    c.add_argument("--let-init", choices=["auto", "ones", "smooth"], default="auto",
                   help="LET scale init; auto = SmoothQuant-style for weight-activation runs, ones for weight-only")
    r = p.add_argument_group("ray")
    r.add_argument("--address", default=None,
                   help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray on 127.0.0.1)")
    r.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="calibrator device")
    r.add_argument("--num-cpus", type=int, default=None, help="CPUs for the calibrator actor")
    r.add_argument("--activation-budget", type=parse_bytes, default=None, metavar="BYTES",
                   help="RAM allowed for the calibrator's activation caches (3 x nsamples x seqlen x hidden x 4 bytes at "
                   "peak); above it they live in memory-mapped files under --spill-dir; unset = no limit")
    r.add_argument("--spill-dir", default=None, help="local directory for spilled activation caches; unset = the temp dir")
    r.add_argument("--workers", type=int, default=1,
                   help="data-parallel calibrator workers: the calibration samples are split between them, each keeps "
                   "its share of the activation caches for the whole run, and they all-reduce the gradients of the "
                   "learnable parameters every step (gloo on CPU, nccl on GPU); workers may sit on different nodes")
    r.add_argument("--gpus-per-worker", type=float, default=None, help="GPUs per worker (default: 1 if the cluster has GPUs)")
    r.add_argument("--cpus-per-worker", type=int, default=None,
                   help="CPUs per worker (default: --num-cpus, or the largest node's CPUs, divided by --workers)")
    r.add_argument("--collective-timeout", type=float, default=120.0, metavar="SECONDS",
                   help="with --workers > 1: how long a worker waits in one all-reduce or broadcast before the group "
                   "counts as broken (survivors notice a dead worker after this long). It must exceed the longest "
                   "SVD or low-rank solve one worker runs alone: python -m pipeline.plan says when 120 s is too short")
    r.add_argument("--max-restarts", type=int, default=3,
                   help="times a dead calibrator actor is restarted (its caches rebuilt by replay) before giving up")
    return p


def parse_quantize_args(argv: list[str] | None = None) -> QuantizeConfig:
    a = build_parser().parse_args(argv)
    try:
        calib = CalibConfig(method=a.method, wbits=a.wbits, abits=a.abits, group_size=a.group_size, sym=a.sym,
                            epochs=a.epochs, batch_size=a.batch_size, forward_batch_size=a.forward_batch_size, seed=a.seed,
                            lr_lwc=a.lr_lwc, lr_let=a.lr_let,
                            lr_lsi=a.lr_lsi, lsi_block_k=a.lsi_block_k, lsi_relative=a.lsi_relative, let_init=a.let_init,
                            sde_band=a.sde_band, lr_sde=a.lr_sde, lowrank=a.lowrank, rank=a.rank,
                            cross_layer=a.cross_layer, cross_layer_weight=a.cross_layer_weight,
                            recompute_weights=a.recompute_weights, precision=a.precision, solve_dtype=a.solve_dtype,
                            svd=a.svd, svd_dtype=a.svd_dtype)
        return QuantizeConfig(model=a.model, output=a.output, calib=a.calib, calib_cfg=calib, nsamples=a.nsamples,
                              seqlen=a.seqlen, report=a.report, address=a.address, device=a.device,
                              num_cpus=a.num_cpus, restart=a.restart, storage_options=a.storage_options,
                              output_storage_options=a.output_storage_options, max_shard_bytes=a.max_shard_size,
                              activation_budget=a.activation_budget, spill_dir=a.spill_dir, max_restarts=a.max_restarts,
                              workers=a.workers, gpus_per_worker=a.gpus_per_worker, cpus_per_worker=a.cpus_per_worker,
                              collective_timeout=a.collective_timeout,
                              format=a.format)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
