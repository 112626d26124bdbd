"""python -m pipeline.quantize: quantize a checkpoint block by block inside a Ray actor.

Data flows one way: checkpoint reader -> calibrator actor -> shard writer -> manifest. The driver
reads block i+1 while the actor calibrates block i; the model is never loaded whole (one block at
a time, plus the embeddings and head). The manifest, written last, marks the output complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any

import ray
from transformers import AutoTokenizer

from lsiq.arch import UnsupportedArchitecture
from lsiq.capture import capture_first_layer_inputs
from pipeline import native_format, ray_env, resume, storage
from pipeline.calibrator import peak_rss_bytes, remote_calibrator
from pipeline.checkpoint import INDEX_FILE, Checkpoint, CheckpointError
from pipeline.config import QuantizeConfig, parse_quantize_args
from pipeline.data import calibration_ids
from pipeline.model_io import MANIFEST, skeleton, with_tensors
from pipeline.report import write_report
from pipeline.writer import OutputDir, sha256

EXTRA_SHARD = "model-extra.safetensors"
COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model")


def block_shard(i: int) -> str:
    return f"model-layers-{i:05d}.safetensors"


def _fmt_eta(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def run_settings(cfg: QuantizeConfig, ckpt: Checkpoint) -> dict[str, Any]:
    """Everything that determines the output bytes, by content (not by path)."""
    calib_hashes = []
    for f in cfg.calib:
        with open(f, "rb") as fh:
            calib_hashes.append(sha256(fh.read())[:16])
    return dataclasses.asdict(cfg.calib_cfg) | {
        "nsamples": cfg.nsamples, "seqlen": cfg.seqlen, "calib_sha256": calib_hashes,
        "source_config_sha256": sha256(json.dumps(ckpt.config_dict, sort_keys=True).encode())[:16],
        "format": native_format.FORMAT,
    }


def run(cfg: QuantizeConfig, log=None) -> dict[str, Any]:
    """Quantize ``cfg.model`` into ``cfg.output`` (resuming a partial run there); returns the report."""
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
    for f in cfg.calib:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"calibration file not found: {f}")
    settings = run_settings(cfg, ckpt)
    out = OutputDir(cfg.output)
    state = resume.prepare(out, settings, arch.num_layers, cfg.restart)
    if state.complete:
        log(f"output {cfg.output} already holds this run, complete; nothing to do (--restart to redo it)")
        return {"already_complete": True, "output": cfg.output}
    if state.next_block:
        log(f"resuming: blocks 0..{state.next_block - 1} are done, replaying them to rebuild the activation cache")

    tokenizer = AutoTokenizer.from_pretrained(ckpt.root)
    ids = calibration_ids(tokenizer, cfg.calib, cfg.nsamples, cfg.seqlen, ccfg.seed)
    other = ckpt.read(ckpt.other_names())
    model = with_tensors(skeleton(ckpt.config), other)
    hidden, layer_kwargs = capture_first_layer_inputs(model, ids)
    del model
    files = [out.write_tensors(EXTRA_SHARD, other)]
    weight_map = {n: EXTRA_SHARD for n in other}
    del other

    started_ray = ray_env.connect(cfg.address, cfg.num_cpus)
    try:
        gpus = 1 if (cfg.device == "cuda" or (cfg.device == "auto" and ray_env.cluster_gpus() > 0)) else 0
        device = "cuda" if gpus else "cpu"
        cpus = cfg.num_cpus or ray_env.node_cpus()
        log(f"lsiq: {ckpt.config_dict.get('model_type')} {arch.num_layers} blocks, method={ccfg.method} "
            f"W{ccfg.wbits}A{ccfg.abits} g{ccfg.group_size}, {cfg.nsamples}x{cfg.seqlen} tokens, "
            f"{ccfg.epochs} epochs, calibrator on {device} ({cpus} CPUs, {gpus} GPUs)")
        actor = remote_calibrator(ckpt.config_dict, ccfg, device, cpus, gpus)
        cache_bytes = ray.get(actor.set_inputs.remote(hidden, layer_kwargs))
        del hidden
        blocks: list[dict[str, Any]] = []
        n = arch.num_layers
        for rec in state.records:  # replay finished blocks: FP and quantized streams move on
            i = rec["index"]
            tensors, source_fp = ckpt.read_block(i)
            if source_fp != rec["source_fingerprint"]:
                raise resume.ResumeMismatch(f"block {i} of the source changed since it was quantized "
                                            f"(fingerprint {rec['source_fingerprint']} -> {source_fp}); pass --restart")
            stored = out.read_tensors(rec["file"])
            ray.get(actor.replay.remote(i, tensors, stored))
            weight_map.update({k: rec["file"] for k in stored})
            files.append({k: rec[k] for k in ("file", "bytes", "sha256")})
            blocks.append(rec["stats"] | {"resumed": True})
            log(f"block {i + 1}/{n}  replayed (done in an earlier run)")
        t_loop = time.perf_counter()
        first = state.next_block
        if first < n:
            next_tensors, next_fp = ckpt.read_block(first)
            read_bytes = ckpt.nbytes(ckpt.block_names(first))
        for i in range(first, n):
            ref = actor.calibrate.remote(i, next_tensors)
            this_read, this_fp = read_bytes, next_fp
            if i + 1 < n:  # prefetch the next block while this one calibrates
                next_tensors, next_fp = ckpt.read_block(i + 1)
                read_bytes = ckpt.nbytes(ckpt.block_names(i + 1))
            res = ray.get(ref)
            shard = block_shard(i)
            info = out.write_tensors(shard, res["tensors"])
            weight_map.update({k: shard for k in res["tensors"]})
            files.append(info)
            stats = {k: res[k] for k in ("index", "loss_before", "loss_after", "losses", "trainable_params",
                                         "calib_seconds", "seconds", "peak_rss")} \
                | {"bytes_read": this_read, "bytes_written": info["bytes"]}
            blocks.append(stats)
            # the block's checkpoint record goes after its shard: a record always points at a whole shard
            out.write_json(resume.block_record_name(i), {"index": i, "fingerprint": resume.fingerprint(settings),
                                                         "source_fingerprint": this_fp, **info, "stats": stats})
            done = i + 1 - first
            eta = (time.perf_counter() - t_loop) / done * (n - i - 1)
            log(f"block {i + 1}/{n}  loss {res['loss_before']:.4g} -> {res['loss_after']:.4g}  "
                f"{res['seconds']:.1f}s  ETA {_fmt_eta(eta)}")
        actor_peak = ray.get(actor.peak_rss.remote())
        ray.kill(actor)
    finally:
        if started_ray:
            ray.shutdown()

    out.write_json(INDEX_FILE, {"metadata": {"format": native_format.FORMAT}, "weight_map": dict(sorted(weight_map.items()))})
    for name in COPIED_FILES:
        src = storage.join(ckpt.root, name)
        if ckpt.fs.exists(src):
            out.write_bytes(name, ckpt.fs.cat_file(src))
    wall = time.perf_counter() - t_start
    report = {
        "model": cfg.model,
        "output": cfg.output,
        "config": dataclasses.asdict(ccfg) | {"nsamples": cfg.nsamples, "seqlen": cfg.seqlen},
        "fingerprint": resume.fingerprint(settings),
        "device": device,
        "resumed_blocks": len(state.records),
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
        "settings": settings,
        "fingerprint": resume.fingerprint(settings),
        "num_layers": arch.num_layers,
        "files": files,
    })
    log(f"done: {arch.num_layers} blocks in {_fmt_eta(wall)}, output {cfg.output}")
    return report


def main(argv: list[str] | None = None) -> int:
    cfg = parse_quantize_args(argv)
    try:
        run(cfg)
    except (CheckpointError, UnsupportedArchitecture, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
