"""The driver of a quantization run: checks the inputs, opens the output, and runs the block DAG.
``python -m pipeline.quantize`` is its command line; ``run(cfg)`` is the same from Python.

Data flows one way: reader actor -> calibrator actor -> writer actor -> manifest (see
:mod:`pipeline.dag`). The reader fetches block i+1 while block i calibrates and the writer stores
block i-1; the model is never loaded whole, by the driver or any actor (one block at a time, plus
the embeddings and head in the driver during setup). The manifest, written last, marks the
output complete; per-block checkpoint records let a rerun resume.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import threading
import time
from typing import Any

import ray
from safetensors.torch import save as safetensors_save
from transformers import AutoTokenizer

from lsiq import methods
from lsiq.capture import capture_layer_inputs
from lsiq.config import CalibConfig
from lsiq.parallel import shard_range
from pipeline import formats, ray_env, resume, storage
from pipeline.actors import peak_rss_bytes, remote_reader, remote_writer
from pipeline.calibrator import form_group, remote_calibrators
from pipeline.checkpoint import INDEX_FILE, Checkpoint
from pipeline.config import QuantizeConfig
from pipeline.dag import BlockDAG
from pipeline.data import calibration_ids
from pipeline.model_io import MANIFEST, local_copy, skeleton, with_tensors
from pipeline.report import write_report
from pipeline.writer import SHARD_METADATA, OutputDir, sha256

EXTRA_SHARD = "model-extra.safetensors"
COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model")


def _fmt_eta(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _budget(ccfg: CalibConfig, nsamples: int) -> str:
    """How much a block trains, in words (nothing for the closed-form methods)."""
    if not ccfg.trains:
        return "no training"
    return f"{ccfg.steps_for(nsamples)} steps of {ccfg.batch_size} sample(s) per block"


def run_settings(cfg: QuantizeConfig, ckpt: Checkpoint) -> dict[str, Any]:
    """Everything that determines the output bytes, by content (not by path)."""
    calib_hashes = []
    for f in cfg.calib:
        with open(f, "rb") as fh:
            calib_hashes.append(sha256(fh.read())[:16])
    return dataclasses.asdict(cfg.calib_cfg) | {
        "nsamples": cfg.nsamples, "seqlen": cfg.seqlen, "calib_sha256": calib_hashes,
        "data_seed": cfg.calib_cfg.seed if cfg.data_seed is None else cfg.data_seed,
        "source_config_sha256": sha256(json.dumps(ckpt.config_dict, sort_keys=True).encode())[:16],
        "format": formats.get(cfg.format).FORMAT,
    }


def _open_output(out: OutputDir, cfg: QuantizeConfig, settings: dict[str, Any], num_layers: int) -> resume.ResumeState:
    try:
        return resume.prepare(out, settings, num_layers, cfg.restart)
    except PermissionError as e:
        raise storage.StorageError(f"access to output {cfg.output!r} refused (check the credentials): {e}") from e
    except storage.StorageError as e:
        raise storage.StorageError(f"cannot reach output {cfg.output!r}: {e}") from e


def _experts_note(stats: dict[str, Any]) -> str:
    """The progress line's note on a mixture-of-experts block: the experts rounded to nearest for
    lack of routed tokens (the report has every expert's count)."""
    ex = stats.get("experts")
    if not ex or not ex["rtn_fallback"]:
        return ""
    low = ", ".join(f"{e} ({ex['routed_tokens'][e]} tokens)" for e in ex["rtn_fallback"])
    return f"  RTN for experts under {100 * ex['min_tokens']:.3g}% of the tokens: {low}"


def _check_moe(cfg: QuantizeConfig, arch: Any, log: Any) -> None:
    """What a mixture-of-experts model cannot do yet (ValueError, one line), and its output format:
    native where no other is loaded (gpt-oss), a warning where transformers cannot load GPTQ experts."""
    from lsiq.moe import moe_unsupported

    missing = moe_unsupported(cfg.calib_cfg)
    if missing:
        raise ValueError(f"{arch.name} (mixture of experts): {missing} is not supported for mixture-of-experts models")
    if cfg.format_default and formats.native_only(arch) and cfg.format != formats.native_format.NAME:
        log(f"{arch.name}: writing --format native ({formats.native_only(arch)})")
        cfg.format = formats.native_format.NAME
    elif cfg.format == formats.gptq_format.NAME:
        log(f"warning: {arch.name}: transformers 5.25 does not load GPTQ experts (its GPTQ loader replaces nn.Linear "
            "modules only; the experts stay uninitialised): serve this output with vLLM, or quantize with --sym "
            "--wbits 4 (compressed-tensors), which transformers loads")


def run(cfg: QuantizeConfig, log=None) -> dict[str, Any]:
    """Quantize ``cfg.model`` into ``cfg.output`` (resuming a partial run there); returns the report."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    t_start = time.perf_counter()
    phases: dict[str, float] = {}
    ccfg = cfg.calib_cfg
    needs_grads = methods.get(ccfg.method).needs_output_grads  # OAC: the FP loss gradient at every block
    ckpt = Checkpoint(cfg.model, cfg.storage_options)
    arch = ckpt.arch
    if arch.unpaired:  # the generic fallback: no LET pairs, one Hessian per linear
        log(f"warning: {arch.unpaired}")
    n = arch.num_layers
    for name, (_out_f, in_f) in arch.linear_shapes().items():
        try:
            ccfg.spec.groups(in_f)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    if arch.family is not None and arch.family.experts is not None:
        _check_moe(cfg, arch, log)
    formats.check(cfg.format, ccfg.spec, ccfg.abits, arch, ccfg.lowrank is not None)
    fmt = formats.get(cfg.format)
    qconfig = formats.quantization_config(cfg.format, ccfg.spec, arch)  # built now: a failure here leaves nothing written
    out = OutputDir(cfg.output, cfg.out_storage_options)
    out.check_writable()
    for f in cfg.calib:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"calibration file not found: {f}")
    # the calibration windows are drawn before the output is touched: a text that cannot give them
    # (empty, too short) is bad input, and must not leave a run record that blocks the corrected rerun
    with local_copy(ckpt.url, ckpt.storage_options, names=COPIED_FILES) as tok_dir:
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    ids = calibration_ids(tokenizer, cfg.calib, cfg.nsamples, cfg.seqlen,
                          ccfg.seed if cfg.data_seed is None else cfg.data_seed)
    settings = run_settings(cfg, ckpt)
    fingerprint = resume.fingerprint(settings)
    state = _open_output(out, cfg, settings, n)
    if state.complete:
        log(f"output {cfg.output} already holds this run, complete; nothing to do (--restart to redo it)")
        return {"already_complete": True, "output": cfg.output}
    if state.next_block:
        log(f"resuming: blocks 0..{state.next_block - 1} are done, replaying them to rebuild the activation cache")

    other = ckpt.read(ckpt.other_names())
    model = with_tensors(skeleton(ckpt.config), other)
    hidden, layer_inputs = capture_layer_inputs(model, ids)  # every layer type's mask and rotary embeddings
    del model
    extra_map = {k: EXTRA_SHARD for k in other}
    extra_bytes = safetensors_save(other, metadata=SHARD_METADATA)
    head = other if needs_grads else None  # OAC's loss needs the final norm and lm_head
    del other  # only the serialized copy while it uploads
    extra = out.write_bytes(EXTRA_SHARD, extra_bytes)
    del extra_bytes

    records: dict[int, dict[str, Any]] = {}
    earlier = {rec["index"] for rec in state.records}
    on_term = signal.getsignal(signal.SIGTERM)
    started_ray = ray_env.connect(cfg.address, cfg.num_cpus)
    if on_term is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_term)  # ray.init installs its own (a native stack dump): keep the caller's
    try:
        workers = cfg.workers
        want_gpu = cfg.device == "cuda" or (cfg.device == "auto" and ray_env.cluster_gpus() > 0)
        gpus = (cfg.gpus_per_worker if cfg.gpus_per_worker is not None else 1) if want_gpu else 0
        device = "cuda" if gpus else "cpu"
        # a resumed run equals an uninterrupted one only on the device type its blocks were calibrated on
        # (other kernels round differently, and --solve-dtype auto is float64 on a CPU, float32 on a GPU)
        done_on = sorted({rec["stats"].get("device") for rec in state.records} - {None, device})
        if done_on:
            raise resume.ResumeMismatch(
                f"output {cfg.output!r} holds blocks 0..{state.next_block - 1} calibrated on {done_on[0]}, and this "
                f"run would calibrate on {device}: the result would not equal an uninterrupted run; rerun with "
                f"--device {done_on[0]} to resume, or pass --restart")
        cpus = cfg.cpus_per_worker or max(1, (cfg.num_cpus or ray_env.node_cpus()) // workers)
        log(f"lsiq: {ckpt.config_dict.get('model_type')} {n} blocks, method={ccfg.method} "
            f"W{ccfg.wbits}A{ccfg.abits} g{ccfg.group_size}, format {cfg.format}, {cfg.nsamples}x{cfg.seqlen} tokens, "
            f"{_budget(ccfg, cfg.nsamples)}, {workers} calibrator worker(s) on {device} ({cpus} CPUs, {gpus} GPUs each)")
        # each worker's share of the samples goes to it once and stays there for the whole run
        input_refs = [ray.put((hidden[shard_range(cfg.nsamples, workers, r)], layer_inputs)) for r in range(workers)]
        del hidden
        if needs_grads:  # the head's tensors and each worker's token ids, for the loss gradient
            head_ref = ray.put(head)
            del head
            ids_refs = [ray.put(ids[shard_range(cfg.nsamples, workers, r)]) for r in range(workers)]
        calibrators = remote_calibrators(ckpt.model_config_dict, ccfg, device, cpus, gpus, workers, cfg.nsamples,
                                         cfg.activation_budget, cfg.spill_dir, cfg.max_restarts, cfg.format)
        dag = BlockDAG(remote_reader(ckpt), calibrators, remote_writer(cfg.output, cfg.out_storage_options,
                                                                        fingerprint, cfg.max_shard_bytes),
                       cross_layer=ccfg.cross_layer)

        def check_source(meta: dict[str, Any], rec: dict[str, Any]) -> None:
            if meta["fingerprint"] != rec["source_fingerprint"]:
                raise resume.ResumeMismatch(
                    f"block {rec['index']} of the source changed since it was quantized "
                    f"(fingerprint {rec['source_fingerprint']} -> {meta['fingerprint']}); pass --restart")

        phases["setup"] = time.perf_counter() - t_start
        restarts = 0
        while True:
            try:
                t0 = time.perf_counter()
                form_group(calibrators, cfg.collective_timeout)
                cache = ray.get([c.set_inputs.remote(ref) for c, ref in zip(calibrators, input_refs, strict=True)])[0]
                if needs_grads and state.next_block < n:
                    t_oac = time.perf_counter()
                    oac_loss, oac_caches = dag.oac_pass(n, state.next_block, head_ref, ids_refs,
                                                        cfg.nsamples * (cfg.seqlen - 1))
                    cache = cache | oac_caches  # the pass holds a cache per block: the run's peak
                    phases["oac_pass"] = phases.get("oac_pass", 0.0) + time.perf_counter() - t_oac
                    log(f"OAC pass: FP model loss {oac_loss:.4f} on the calibration set; gradients of every block "
                        f"kept ({phases['oac_pass']:.1f}s)")
                for i in dag.replay(state.records, check_source):
                    why = "done in an earlier run" if i in earlier else "cache rebuilt after a calibrator restart"
                    log(f"block {i + 1}/{n}  replayed ({why})")
                phases["replay"] = phases.get("replay", 0.0) + time.perf_counter() - t0
                t_loop = time.perf_counter()
                first = state.next_block
                for rec in dag.run(first, n):
                    i = rec["index"]
                    records[i] = rec
                    st = rec["stats"]
                    eta = (time.perf_counter() - t_loop) / (i + 1 - first) * (n - i - 1)
                    log(f"block {i + 1}/{n}  error {100 * st['rel_before']:.3g}% (RTN) -> {100 * st['rel_after']:.3g}%  "
                        f"MSE {st['loss_before']:.4g} -> {st['loss_after']:.4g}  "
                        f"{st['seconds']:.1f}s  io-wait {st['io_wait_seconds']:.1f}s  ETA {_fmt_eta(eta)}"
                        f"{_experts_note(st)}")
                phases["blocks"] = time.perf_counter() - t_loop
                break
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
                dag.drain()
                # a worker that Ray restarted has no caches (position -1); the survivors of a data-parallel
                # group fail their collective when a peer dies. Anything else is a real error.
                lost = [s["rank"] for s in _worker_states(calibrators) if s["position"] < 0]
                if not lost and not isinstance(e, ray.exceptions.RayActorError):
                    raise
                restarts += 1
                if restarts > cfg.max_restarts:
                    raise RuntimeError(f"calibrator workers died {restarts} times; giving up ({e})") from e
                state = resume.prepare(out, settings, n, restart=False)
                log(f"calibrator actor died (worker {lost or '?'}; {type(e).__name__}); Ray restarted it "
                    f"({restarts}/{cfg.max_restarts}); rebuilding the caches by replaying blocks "
                    f"0..{state.next_block - 1}, then redoing block {state.next_block + 1}")
        for rec in state.records:
            records.setdefault(rec["index"], rec)
        peak_calibrator = max(ray.get([c.peak_rss.remote() for c in calibrators]))
        worker_nodes = [s["node_id"] for s in _worker_states(calibrators)]
        for actor in (dag.reader, *calibrators, dag.writer):
            ray.kill(actor)
    finally:
        if started_ray:
            ray.shutdown()

    t_finish = time.perf_counter()
    files = [extra] + [f for i in range(n) for f in records[i]["files"]]
    weight_map = extra_map | {k: v for i in range(n) for k, v in records[i]["weight_map"].items()}
    out.write_json(INDEX_FILE, {"metadata": {"format": fmt.FORMAT}, "weight_map": dict(sorted(weight_map.items()))})
    for name in COPIED_FILES:
        src = storage.join(ckpt.root, name)
        if name == "config.json" and (qconfig is not None or ckpt.source_quant is not None):
            # an FP8 source's quantization_config describes the source, not this output
            out.write_json(name, ckpt.model_config_dict | ({"quantization_config": qconfig} if qconfig else {}))
        elif storage.exists(ckpt.fs, src):
            out.write_bytes(name, storage.read_all(ckpt.fs, src))
    if fmt is formats.gptq_format:  # AutoGPTQ's own file, which older loaders read instead of config.json
        out.write_json("quantize_config.json", qconfig)
    blocks = [records[i]["stats"] | {"resumed": i in earlier} for i in range(n)]
    new_blocks = [b for b in blocks if not b["resumed"]]
    report = {
        "model": cfg.model,
        "output": cfg.output,
        "config": dataclasses.asdict(ccfg) | {"nsamples": cfg.nsamples, "seqlen": cfg.seqlen},
        "fingerprint": fingerprint,
        "device": device,
        "resumed_blocks": len(earlier),
        "calibrator_restarts": restarts,
        "workers": workers,
        "format": cfg.format,
        "worker_nodes": worker_nodes,  # the Ray node each calibrator worker ran on (rank order)
        "calib_seconds": sum(b["seconds"] for b in new_blocks),
        "io_wait_seconds": sum(b["io_wait_seconds"] for b in new_blocks),
        "bytes_read": sum(b["bytes_read"] for b in new_blocks),
        "bytes_written": sum(b["bytes_written"] for b in new_blocks),
        "lowrank_bytes": sum(b.get("lowrank_bytes", 0) for b in blocks),  # float16 A and B of --lowrank
        "trainable_params": sum(b["trainable_params"] for b in blocks),
        "activation_cache_bytes": cache["cache_bytes"],
        "activation_cache_peak_bytes": cache["peak_cache_bytes"],
        "activation_spilled": cache["spilled"],
        "peak_rss": {
            "driver": peak_rss_bytes(),
            "reader": max((b["peak_rss_reader"] for b in new_blocks), default=0),
            "calibrator": peak_calibrator,
            "writer": max((b["peak_rss_writer"] for b in new_blocks), default=0),
        },
        "blocks": blocks,
    }
    if cfg.report:
        report["plot"] = write_report(cfg.report, report)
    # The manifest is written last: its presence with status "complete" is what makes the run complete.
    out.write_json(MANIFEST, {
        "status": "complete",
        "format": fmt.FORMAT,
        "quantization": {"method": ccfg.method, "wbits": ccfg.wbits, "abits": ccfg.abits,
                         "group_size": ccfg.group_size, "sym": ccfg.sym, "zero_min": ccfg.zero_min,
                         "lowrank": ccfg.lowrank, "rank": ccfg.rank if ccfg.lowrank else None},
        "settings": settings,
        "fingerprint": fingerprint,
        "num_layers": n,
        "files": files,
    })
    phases["finish"] = time.perf_counter() - t_finish
    report["wall_seconds"] = time.perf_counter() - t_start
    report["phases"] = phases
    if cfg.report:
        write_report(cfg.report, report)
    log(f"done: {n} blocks in {_fmt_eta(report['wall_seconds'])}; wrote {cfg.output} as {cfg.format} "
        f"(W{ccfg.wbits}A{ccfg.abits} g{ccfg.group_size}, {ccfg.method})")
    if cfg.report:
        log(f"report: {cfg.report}, plot: {report['plot']}")
    log("load it: " + fmt.LOAD.replace("OUT", cfg.output))
    return report


def _worker_states(calibrators: list[ray.actor.ActorHandle], wait_s: float = 300.0) -> list[dict[str, Any]]:
    """Each calibrator's state, waiting for the ones Ray is restarting."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return ray.get([c.state.remote() for c in calibrators])
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def cause(e: BaseException) -> BaseException:
    """The user's error inside a Ray task error (its traceback is noise for a CLI user)."""
    while isinstance(e, ray.exceptions.RayTaskError) and e.cause is not None:
        e = e.cause
    return e
