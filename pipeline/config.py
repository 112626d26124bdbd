"""Run configuration: typed dataclasses with defaults, and the one place that parses the CLI."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any

from lsiq.config import CalibConfig
from lsiq.methods import names as method_names
from pipeline.cli import BadInput, add_budget_args, add_config_args, config_from_args, per_worker_batch

# pipeline.formats.FORMATS, named here without importing the formats (and torch) so that --help is
# quick; tests/test_formats.py checks that the two agree
FORMAT_NAMES = ("compressed-tensors", "gptq", "native")


@dataclass
class QuantizeConfig:
    """Everything `python -m pipeline.quantize` needs."""

    model: str
    output: str
    calib: list[str]
    calib_cfg: CalibConfig = field(default_factory=CalibConfig)
    nsamples: int = 16
    seqlen: int = 256
    data_seed: int | None = None  # the calibration windows' draw; None: calib_cfg.seed
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
        from pipeline import formats  # imports torch: not needed for --help

        if self.collective_timeout <= 0:
            raise ValueError(f"--collective-timeout must be > 0 seconds, got {self.collective_timeout}")
        self.format_default = self.format is None  # chosen for the user: a family may need another (gpt-oss)
        if self.format is None:
            self.format = formats.default_format(self.calib_cfg.wbits, self.calib_cfg.abits,
                                                 self.calib_cfg.lowrank is not None, self.calib_cfg.sym)
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


def _methods_epilog() -> str:
    from lsiq import methods

    lines = ["methods (--method):"]
    for name in methods.names():
        lines.append(f"  {name:14s} {methods.summary(name)}")
    defaults = ", ".join(f"W{b}: {methods.default_method(b)}" for b in (2, 3, 4))
    lines.append(f"default method: {defaults}; weight-activation runs: {methods.default_method(4, 8)}")
    lines.append("")
    lines.append("example:\n  python -m pipeline.quantize --model fixtures/smollm2 --output runs/w3 "
                 "--calib fixtures/texts/calib.txt --wbits 3 --report runs/w3/report.json")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.quantize",
        description="Quantize a sharded safetensors decoder checkpoint block by block inside a Ray actor. "
        "Each block is calibrated on the inputs the already-quantized blocks produce, against the FP block's "
        "outputs; the model is never loaded whole.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_methods_epilog(),
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
    io.add_argument("--format", choices=FORMAT_NAMES, default=None,
                    help="output layout. compressed-tensors: pack-quantized, 4 and 8 bits, weight-only (vLLM, and "
                    "transformers with the compressed-tensors package); gptq: GPTQ v1, 2/3/4/8 bits, weight-only "
                    "(vLLM, transformers with gptqmodel); native: ours, any setting incl. weight-activation, read by "
                    "python -m pipeline.evaluate. Default: what a plain from_pretrained(out) loads: gptq for "
                    "asymmetric 2/3/4/8-bit grids, compressed-tensors for symmetric 4/8-bit ones, native for the rest")
    io.add_argument("--calib", nargs="+", required=True, metavar="FILE", help="calibration text file(s)")
    io.add_argument("--report", default=None, help="JSON report path (a PNG plot is written beside it)")
    io.add_argument("--restart", action="store_true",
                    help="discard what the output holds (a finished run or the checkpoints of an unfinished one) and "
                    "start over; without it, rerunning the same command resumes after the last finished block")
    io.add_argument("--overwrite", dest="restart", action="store_true", help=argparse.SUPPRESS)  # old name
    groups = add_config_args(p, choices={"method": method_names()},
                             titles={"method": "how the trained methods learn", "low-rank": "low-rank corrections"})
    c = groups["calibration"]
    add_budget_args(c, QuantizeConfig.nsamples, QuantizeConfig.seqlen)
    c.add_argument("--data-seed", type=int, default=None,
                   help="seed of the calibration windows' draw when it should differ from --seed (default: --seed)")
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
        calib = per_worker_batch(config_from_args(a, CalibConfig), a.batch_size, a.workers)
        return QuantizeConfig(model=a.model, output=a.output, calib=a.calib, calib_cfg=calib, nsamples=a.nsamples,
                              seqlen=a.seqlen, data_seed=a.data_seed, report=a.report, address=a.address,
                              device=a.device, num_cpus=a.num_cpus, restart=a.restart, storage_options=a.storage_options,
                              output_storage_options=a.output_storage_options, max_shard_bytes=a.max_shard_size,
                              activation_budget=a.activation_budget, spill_dir=a.spill_dir, max_restarts=a.max_restarts,
                              workers=a.workers, gpus_per_worker=a.gpus_per_worker, cpus_per_worker=a.cpus_per_worker,
                              collective_timeout=a.collective_timeout,
                              format=a.format)
    except ValueError as e:
        raise BadInput(f"{e}") from None
