"""python -m pipeline.quantize: quantize a checkpoint block by block inside a Ray actor.

Data flows one way: checkpoint reader -> calibrator actor -> shard writer -> manifest. The driver
reads block i+1 while the actor calibrates block i; the model is never loaded whole (one block at
a time, plus the embeddings and head). The manifest, written last, marks the output complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
import time
from typing import Any

import ray
import torch
from safetensors.torch import save as safetensors_save
from transformers import AutoTokenizer

from lsiq.arch import UnsupportedArchitecture
from lsiq.capture import capture_first_layer_inputs
from pipeline import native_format, ray_env, storage
from pipeline.calibrator import peak_rss_bytes, remote_calibrator
from pipeline.checkpoint import INDEX_FILE, Checkpoint, CheckpointError
from pipeline.config import QuantizeConfig, parse_quantize_args
from pipeline.data import calibration_ids
from pipeline.model_io import MANIFEST, skeleton, with_tensors
from pipeline.report import write_report

EXTRA_SHARD = "model-extra.safetensors"
COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model")


def block_shard(i: int) -> str:
    return f"model-layers-{i:05d}.safetensors"


def _fmt_eta(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class OutputDir:
    """The output location: refuses to mix runs, writes shards atomically, writes the manifest last."""

    def __init__(self, url: str, overwrite: bool) -> None:
        self.fs, self.root = storage.filesystem(url)
        existing = self.fs.ls(self.root, detail=False) if self.fs.exists(self.root) else []
        ours = [p for p in existing if p.rsplit("/", 1)[-1] == MANIFEST or p.endswith(".safetensors")]
        if ours and not overwrite:
            raise FileExistsError(f"output {url!r} already holds a quantized run ({len(ours)} files); "
                                  "choose another --output or pass --overwrite")
        manifest = storage.join(self.root, MANIFEST)
        if self.fs.exists(manifest):  # the old run must stop looking complete before anything else
            self.fs.rm(manifest)
        for p in ours:
            if self.fs.exists(p):
                self.fs.rm(p)
        self.fs.makedirs(self.root, exist_ok=True)

    def write_tensors(self, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, Any]:
        data = safetensors_save(tensors, metadata=metadata)
        storage.write_bytes(self.fs, storage.join(self.root, name), data)
        return {"file": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    def write_json(self, name: str, obj: Any) -> None:
        storage.write_json(self.fs, storage.join(self.root, name), obj)

    def copy_from(self, ckpt: Checkpoint, name: str) -> bool:
        src = storage.join(ckpt.root, name)
        if not ckpt.fs.exists(src):
            return False
        storage.write_bytes(self.fs, storage.join(self.root, name), ckpt.fs.cat_file(src))
        return True


def run(cfg: QuantizeConfig, log=None) -> dict[str, Any]:
    """Quantize ``cfg.model`` into ``cfg.output``; returns the report."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    t_start = time.perf_counter()
    ccfg = cfg.calib_cfg
    ckpt = Checkpoint(cfg.model)
    arch = ckpt.arch
    for name, (_out_f, in_f) in arch.linear_shapes().items():
        try:
            ccfg.spec.groups(in_f)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    out = OutputDir(cfg.output, cfg.overwrite)
    # One metadata key only: safetensors writes its metadata map in hash order, so several keys
    # would make the bytes differ between identical runs. The quantization settings live in the manifest.
    meta = {"format": "pt"}

    tokenizer = AutoTokenizer.from_pretrained(ckpt.root)
    ids = calibration_ids(tokenizer, cfg.calib, cfg.nsamples, cfg.seqlen, ccfg.seed)
    other = ckpt.read(ckpt.other_names())
    model = with_tensors(skeleton(ckpt.config), other)
    hidden, layer_kwargs = capture_first_layer_inputs(model, ids)
    del model
    files = [out.write_tensors(EXTRA_SHARD, other, meta)]
    weight_map = {n: EXTRA_SHARD for n in other}
    del other

    started_ray = ray_env.connect(cfg.address, cfg.num_cpus)
    try:
        gpus = 1 if (cfg.device == "cuda" or (cfg.device == "auto" and ray_env.cluster_gpus() > 0)) else 0
        device = "cuda" if gpus else "cpu"
        cpus = cfg.num_cpus or ray_env.cluster_cpus()
        log(f"lsiq: {ckpt.config_dict.get('model_type')} {arch.num_layers} blocks, method={ccfg.method} "
            f"W{ccfg.wbits}A{ccfg.abits} g{ccfg.group_size}, {cfg.nsamples}x{cfg.seqlen} tokens, "
            f"{ccfg.epochs} epochs, calibrator on {device} ({cpus} CPUs, {gpus} GPUs)")
        actor = remote_calibrator(ckpt.config_dict, ccfg, device, cpus, gpus)
        cache_bytes = ray.get(actor.set_inputs.remote(hidden, layer_kwargs))
        del hidden
        blocks: list[dict[str, Any]] = []
        n = arch.num_layers
        t_loop = time.perf_counter()
        next_tensors = ckpt.read_block(0)
        read_bytes = ckpt.nbytes(ckpt.block_names(0))
        for i in range(n):
            ref = actor.calibrate.remote(i, next_tensors)
            this_read = read_bytes
            if i + 1 < n:  # prefetch the next block while this one calibrates
                next_tensors = ckpt.read_block(i + 1)
                read_bytes = ckpt.nbytes(ckpt.block_names(i + 1))
            res = ray.get(ref)
            shard = block_shard(i)
            info = out.write_tensors(shard, res["tensors"], meta)
            weight_map.update({k: shard for k in res["tensors"]})
            files.append(info)
            blocks.append({k: res[k] for k in ("index", "loss_before", "loss_after", "losses", "trainable_params",
                                               "calib_seconds", "seconds", "peak_rss")}
                          | {"bytes_read": this_read, "bytes_written": info["bytes"]})
            elapsed = time.perf_counter() - t_loop
            eta = elapsed / (i + 1) * (n - i - 1)
            log(f"block {i + 1}/{n}  loss {res['loss_before']:.4g} -> {res['loss_after']:.4g}  "
                f"{res['seconds']:.1f}s  ETA {_fmt_eta(eta)}")
        actor_peak = ray.get(actor.peak_rss.remote())
        ray.kill(actor)
    finally:
        if started_ray:
            ray.shutdown()

    out.write_json(INDEX_FILE, {"metadata": {"format": native_format.FORMAT}, "weight_map": dict(sorted(weight_map.items()))})
    for name in COPIED_FILES:
        out.copy_from(ckpt, name)
    wall = time.perf_counter() - t_start
    report = {
        "model": cfg.model,
        "output": cfg.output,
        "config": dataclasses.asdict(ccfg) | {"nsamples": cfg.nsamples, "seqlen": cfg.seqlen},
        "fingerprint": cfg.fingerprint(),
        "device": device,
        "wall_seconds": wall,
        "calib_seconds": sum(b["calib_seconds"] for b in blocks),
        "trainable_params": sum(b["trainable_params"] for b in blocks),
        "activation_cache_bytes": cache_bytes,
        "peak_rss_driver": peak_rss_bytes(),
        "peak_rss_calibrator": actor_peak,
        "blocks": blocks,
    }
    if cfg.report:
        report["plot"] = write_report(cfg.report, report)
    # The manifest is written last: its presence with status "complete" is what makes the run complete.
    out.write_json(MANIFEST, {
        "status": "complete",
        "format": native_format.FORMAT,
        "quantization": {"method": ccfg.method, "wbits": ccfg.wbits, "abits": ccfg.abits,
                         "group_size": ccfg.group_size, "sym": ccfg.sym},
        "calibration": dataclasses.asdict(ccfg) | {"nsamples": cfg.nsamples, "seqlen": cfg.seqlen,
                                                   "calib_files": [str(c).rsplit("/", 1)[-1] for c in cfg.calib]},
        "fingerprint": cfg.fingerprint(),
        "num_layers": arch.num_layers,
        "files": files,
    })
    log(f"done: {arch.num_layers} blocks in {_fmt_eta(wall)}, output {cfg.output}")
    return report


def main(argv: list[str] | None = None) -> int:
    cfg = parse_quantize_args(argv)
    try:
        run(cfg)
    except (CheckpointError, UnsupportedArchitecture, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
