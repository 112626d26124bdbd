"""Scheduled re-quantization: quantize every new checkpoint that appears under a prefix.

    python -m pipeline.schedule --source s3://ckpts/ --output s3://quantized/ --config RUN.yaml --once
    python -m pipeline.schedule ... --every 15m --address http://127.0.0.1:8265   # as Ray jobs

Each pass lists the folders under ``--source`` that hold a checkpoint (config.json plus an index
or model.safetensors), skips the ones whose shards are not all there yet (a half-finished upload),
and the ones already quantized with the same configuration (``schedule.json`` in the output holds
the fingerprints of the source and of the configuration), and quantizes the rest into the same
relative folder under ``--output``: as a Ray job through the Jobs SDK with ``--address``, else in
a local ``python -m pipeline.quantize`` process. A lease in the output store makes sure that of
several schedulers only one works on a checkpoint at a time; a dead scheduler's lease expires and
is taken over. A run that fails is tried again on a later pass, after a back-off that doubles with
each failure of the same checkpoint and configuration (``--retry-backoff``), so a checkpoint that
cannot be quantized does not start a doomed job on every pass. The last stdout line of each pass is
a JSON summary.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import yaml

from pipeline import lease as leases
from pipeline import storage
from pipeline.checkpoint import INDEX_FILE, SINGLE_FILE, Checkpoint, CheckpointError
from pipeline.cli import BadInput
from pipeline.config import build_parser as quantize_parser
from pipeline.config import parse_json_object
from pipeline.resume import MANIFEST

RECORD = "schedule.json"
LEASES = ".lsiq-leases"
RESERVED = {"model", "output", "restart", "overwrite", "address"}  # set by the scheduler, per checkpoint


@dataclass
class ScheduleConfig:
    """Everything `python -m pipeline.schedule` needs."""

    source: str
    output: str
    run: dict[str, Any]  # RUN.yaml: quantize's flags by name (method: lsi, group_size: 64, calib: [...])
    once: bool = True
    every_s: float = 900.0
    address: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    output_storage_options: dict[str, Any] | None = None
    lease_s: float = 600.0
    owner: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    runtime_env: dict[str, Any] | None = None  # for Ray jobs (RUN.yaml's runtime_env)
    poll_s: float = 2.0
    retry_backoff_s: float = 600.0  # wait after a failed run before the next try; doubles per failure
    retry_backoff_max_s: float = 86400.0

    @property
    def out_options(self) -> dict[str, Any]:
        return self.storage_options if self.output_storage_options is None else self.output_storage_options


def quantize_args(run: dict[str, Any]) -> list[str]:
    """RUN.yaml's settings as quantize's command-line flags (validated by quantize's own parser)."""
    bad = RESERVED & set(run)
    if bad:
        raise ValueError(f"RUN.yaml may not set {', '.join(sorted(bad))}: the scheduler sets them per checkpoint")
    known = {a.dest: a for a in quantize_parser()._actions}
    argv: list[str] = []
    for key, value in run.items():
        dest = key.replace("-", "_")
        if dest not in known or not known[dest].option_strings:
            raise ValueError(f"RUN.yaml: unknown setting {key!r} (the settings are pipeline.quantize's flags, "
                             "e.g. method, wbits, group_size, calib, nsamples)")
        flag = known[dest].option_strings[0]
        if isinstance(value, bool):
            argv += [flag] if value else []
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        elif isinstance(value, dict):
            argv += [flag, json.dumps(value)]
        else:
            argv += [flag, str(value)]
    quantize_parser().parse_args(["--model", "m", "--output", "o", *argv])  # exits with quantize's message if bad
    return argv


def config_fingerprint(run: dict[str, Any]) -> str:
    """The settings and the calibration texts' contents (not their paths)."""
    texts = []
    for f in run.get("calib", []) or []:
        with open(f, "rb") as fh:
            texts.append(hashlib.sha256(fh.read()).hexdigest())
    settings = {k: v for k, v in run.items() if k not in ("calib", "report")}
    return hashlib.sha256(json.dumps({"settings": settings, "calib": texts}, sort_keys=True).encode()).hexdigest()


def source_fingerprint(ckpt: Checkpoint) -> str:
    """Config, tensor layout and each shard's identity in the store (ETag or mtime, and size)."""
    h = hashlib.sha256(json.dumps(ckpt.config_dict, sort_keys=True).encode())
    for name, info in sorted(ckpt.tensors.items()):
        h.update(f"{name}:{info.dtype}:{info.shape}:{info.begin}:{info.end}".encode())
    for shard in sorted({info.shard for info in ckpt.tensors.values()}):
        h.update(f"{shard}:{_object_id(ckpt.fs, storage.join(ckpt.root, shard))}".encode())
    return h.hexdigest()


def _object_id(fs: Any, path: str) -> str:
    """What identifies an object's content in its store: ETag (S3, GCS md5) or modification time,
    and size. Read fresh (a HEAD), not from a listing's cache, whose entries carry other fields."""
    fs.invalidate_cache(path)
    info = storage.retrying(lambda: fs.info(path), f"look up {path}")
    tag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("mtime") \
        or info.get("LastModified") or info.get("updated")
    return f"{str(tag).strip(chr(34))}:{info.get('size')}"


def find_checkpoints(fs: Any, root: str) -> list[str]:
    """Folders under ``root`` (relative paths, "" for root itself) with a config.json and an index or
    a single model.safetensors."""
    root = root.rstrip("/")
    fs.invalidate_cache()
    files = storage.retrying(lambda: fs.find(root), f"list {root}")
    by_dir: dict[str, set[str]] = {}
    for f in files:
        d, _, base = f.rpartition("/")
        by_dir.setdefault(d, set()).add(base)
    found = []
    for d, names in sorted(by_dir.items()):
        if "config.json" in names and (INDEX_FILE in names or SINGLE_FILE in names):
            rel = d[len(root):].strip("/") if d.startswith(root) else d
            if not rel.split("/")[0].startswith("."):
                found.append(rel)
    return found


def lease_dir(out_root: str, rel: str) -> str:
    """Where the leases on checkpoint ``rel`` live: one folder per checkpoint under the output root."""
    return storage.join(out_root, LEASES, hashlib.sha256(rel.encode()).hexdigest()[:16])


def _url(prefix: str, rel: str) -> str:
    return prefix.rstrip("/") + ("/" + rel if rel else "")


class Scheduler:
    """One scheduler process: passes over the source prefix, one checkpoint at a time."""

    def __init__(self, cfg: ScheduleConfig, log=None) -> None:
        self.cfg = cfg
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.argv = quantize_args(cfg.run)
        self.config_fp = config_fingerprint(cfg.run)
        self.src_fs, self.src_root = storage.filesystem(cfg.source, cfg.storage_options)
        self.out_fs, self.out_root = storage.filesystem(cfg.output, cfg.out_options)
        self.stopping = False

    def pass_once(self) -> dict[str, Any]:
        """One pass over the source prefix; returns what happened to each checkpoint."""
        summary: dict[str, Any] = {"owner": self.cfg.owner, "quantized": [], "done": [], "incomplete": [],
                                   "leased": [], "failed": [], "waiting": []}
        for rel in find_checkpoints(self.src_fs, self.src_root):
            if self.stopping:
                break
            outcome, detail = self._handle(rel)
            summary[outcome].append(rel if detail is None else {"checkpoint": rel, "reason": detail})
        return summary

    def _record(self, rel: str) -> dict[str, Any] | None:
        path = storage.join(self.out_root, rel, RECORD)
        return storage.read_json(self.out_fs, path) if storage.exists(self.out_fs, path) else None

    def _complete(self, rel: str, source_fp: str, rec: dict[str, Any] | None) -> bool:
        """Whether ``rec`` (the output's schedule.json) says this source and configuration are done."""
        if not self._same_run(rec, source_fp) or rec.get("status") != "complete":
            return False
        manifest = storage.join(self.out_root, rel, MANIFEST)
        return storage.exists(self.out_fs, manifest) and storage.read_json(self.out_fs, manifest).get("status") == "complete"

    def _handle(self, rel: str) -> tuple[str, str | None]:
        src = _url(self.cfg.source, rel)
        try:
            ckpt = Checkpoint(src, self.cfg.storage_options)
            source_fp = source_fingerprint(ckpt)
        except (CheckpointError, FileNotFoundError, EOFError, ValueError) as e:
            self.log(f"{rel or '.'}: not ready ({e}); skipped")
            return "incomplete", str(e)
        rec = self._record(rel)
        if self._complete(rel, source_fp, rec):
            return "done", None
        if (waiting := self._backing_off(rec, source_fp)) is not None:
            self.log(f"{rel or '.'}: {waiting}; skipped")
            return "waiting", waiting
        held = leases.try_acquire(self.out_fs, lease_dir(self.out_root, rel), self.cfg.owner, self.cfg.lease_s)
        if held is None:
            self.log(f"{rel or '.'}: another scheduler holds its lease; skipped")
            return "leased", None
        try:
            prev = self._record(rel)
            if self._complete(rel, source_fp, prev):  # finished by another scheduler just before we took the lease
                return "done", None
            return self._quantize(rel, src, source_fp, held, prev)
        finally:
            leases.release(held)

    def _same_run(self, rec: dict[str, Any] | None, source_fp: str) -> bool:
        """Whether ``rec`` is about this source and this configuration."""
        return rec is not None and rec.get("source_fingerprint") == source_fp \
            and rec.get("config_fingerprint") == self.config_fp

    def _backing_off(self, rec: dict[str, Any] | None, source_fp: str) -> str | None:
        """Why this checkpoint waits (its last run with these settings failed, and its back-off has
        not run out), or None."""
        if not self._same_run(rec, source_fp) or rec.get("status") != "failed":
            return None
        if time.time() >= rec.get("retry_after", 0.0):
            return None
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(rec["retry_after"]))
        return f"failed {rec.get('failures', 1)} time(s), next try after {when}; last error: {rec.get('error', '?')}"

    def _failed(self, rel: str, record: dict[str, Any], prev: dict[str, Any] | None, detail: str) -> None:
        """Record a failed run, and when this checkpoint and configuration may be tried again."""
        failures = 1 + (prev.get("failures", 1) if prev and prev.get("status") == "failed"
                        and self._same_run(prev, record["source_fingerprint"]) else 0)
        wait = min(self.cfg.retry_backoff_s * 2 ** (failures - 1), self.cfg.retry_backoff_max_s)
        now = time.time()
        self._write_record(rel, record | {"status": "failed", "failures": failures, "error": detail[-2000:],
                                          "failed_at": now, "retry_after": now + wait})

    def _quantize(self, rel: str, src: str, source_fp: str, held: leases.Lease,
                  prev: dict[str, Any] | None) -> tuple[str, str | None]:
        out = _url(self.cfg.output, rel)
        # Same source and settings as an unfinished earlier attempt: resume it; otherwise start over.
        same = self._same_run(prev, source_fp)
        argv = ["--model", src, "--output", out, *self.argv]
        if self.cfg.storage_options:
            argv += ["--storage-options", json.dumps(self.cfg.storage_options)]
        if self.cfg.output_storage_options is not None:
            argv += ["--output-storage-options", json.dumps(self.cfg.output_storage_options)]
        if prev is not None and not same:
            argv.append("--restart")
        record = {"source": src, "source_fingerprint": source_fp, "config_fingerprint": self.config_fp,
                  "owner": self.cfg.owner, "started_at": time.time(), "status": "running"}
        self._write_record(rel, record)
        self.log(f"{rel or '.'}: quantizing into {out}" + (" (as a Ray job)" if self.cfg.address else ""))
        try:
            ok, detail = (self._run_job if self.cfg.address else self._run_local)(argv, held, source_fp)
        except leases.LeaseLost as e:  # another scheduler has the checkpoint now: its record, not ours
            return "failed", str(e)
        if not ok:
            self._failed(rel, record, prev, detail)
            self.log(f"{rel or '.'}: failed: {detail}")
            return "failed", detail
        record |= {"status": "complete", "finished_at": time.time(), "run": detail}
        self._write_record(rel, record)
        self.log(f"{rel or '.'}: done")
        return "quantized", None

    def _write_record(self, rel: str, record: dict[str, Any]) -> None:
        folder = storage.join(self.out_root, rel)
        if storage.is_local(self.out_fs):
            self.out_fs.makedirs(folder, exist_ok=True)
        storage.write_json(self.out_fs, storage.join(folder, RECORD), record)

    def _keep_lease(self, held: leases.Lease) -> None:
        if held.expires_at - time.time() < held.ttl / 2:
            leases.renew(held)

    def _run_local(self, argv: list[str], held: leases.Lease, source_fp: str) -> tuple[bool, str]:
        cmd = [sys.executable, "-m", "pipeline.quantize", *argv]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        tail: list[str] = []

        def drain() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                tail.append(line)
                del tail[:-20]

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        try:
            while proc.poll() is None:
                self._keep_lease(held)
                try:  # returns as soon as the run ends
                    proc.wait(timeout=self.cfg.poll_s)
                except subprocess.TimeoutExpired:
                    pass
        except BaseException:
            proc.terminate()
            proc.wait()
            raise
        reader.join(timeout=10)
        if proc.returncode != 0:
            return False, f"exit status {proc.returncode}: {''.join(tail[-5:]).strip()}"
        return True, "local process"

    def _run_job(self, argv: list[str], held: leases.Lease, source_fp: str) -> tuple[bool, str]:
        from ray.job_submission import JobStatus, JobSubmissionClient

        client = JobSubmissionClient(self.cfg.address)
        entrypoint = shlex.join(["python", "-m", "pipeline.quantize", *argv])
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=self.cfg.runtime_env,
                                   submission_id=f"lsiq-{source_fp[:10]}-{self.config_fp[:10]}-{uuid.uuid4().hex[:6]}")
        self.log(f"submitted Ray job {job_id}")
        while True:
            status = client.get_job_status(job_id)
            if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                break
            self._keep_lease(held)
            time.sleep(self.cfg.poll_s)
        if status != JobStatus.SUCCEEDED:
            logs = client.get_job_logs(job_id).strip().splitlines()[-5:]
            return False, f"Ray job {job_id} {status}: {' | '.join(logs)}"
        return True, f"ray job {job_id}"

    def loop(self) -> int:
        def stop(signum, frame) -> None:  # finish the checkpoint in hand, then exit
            self.stopping = True

        signal.signal(signal.SIGTERM, stop)
        failed = False
        while True:
            summary = self.pass_once()
            failed = bool(summary["failed"])
            print(json.dumps(summary), flush=True)
            if self.cfg.once or self.stopping:
                return 1 if failed else 0
            deadline = time.time() + self.cfg.every_s
            while time.time() < deadline and not self.stopping:
                time.sleep(min(1.0, deadline - time.time()))
            if self.stopping:
                return 0


def parse_duration(text: str) -> float:
    """``"15m"``, ``"30s"``, ``"2h"``, ``"90"`` (seconds) -> seconds."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([smhd]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (examples: 30s, 15m, 2h)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.schedule",
        description="Find new checkpoints under a prefix and quantize each once per configuration, safely with "
        "several schedulers (leases in the output store). Prints one JSON summary line per pass.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--source", required=True, help="prefix holding checkpoint folders (path or fsspec URL)")
    p.add_argument("--output", required=True, help="prefix for the quantized checkpoints (same relative folders)")
    p.add_argument("--config", required=True, metavar="RUN.yaml",
                   help="pipeline.quantize's settings by flag name (method: lsi, wbits: 3, group_size: 64, "
                   "calib: [eval.txt], ...), plus an optional runtime_env for Ray jobs")
    when = p.add_mutually_exclusive_group(required=True)
    when.add_argument("--once", action="store_true", help="one pass, then exit (for a CronJob)")
    when.add_argument("--every", type=parse_duration, metavar="DURATION", help="a pass every DURATION (15m, 1h)")
    p.add_argument("--address", default=None,
                   help="Ray dashboard address (http://HEAD:8265): submit each run as a Ray job; default: run locally")
    p.add_argument("--storage-options", type=parse_json_object, default={}, metavar="JSON",
                   help="fsspec options for --source (and --output)")
    p.add_argument("--output-storage-options", type=parse_json_object, default=None, metavar="JSON",
                   help="fsspec options for --output when they differ")
    p.add_argument("--lease", type=parse_duration, default="10m",
                   help="lease time; a live scheduler renews it at half time, a dead one's expires")
    p.add_argument("--owner", default=None, help="name recorded in leases (default: host-pid-random)")
    p.add_argument("--retry-backoff", type=parse_duration, default="10m",
                   help="after a failed run, wait this long before trying the same checkpoint and configuration "
                   "again, twice as long after each further failure (at most a day); 0: try again on every pass")
    return p


SECRET_KEYS = {"key", "secret", "token", "password", "aws_access_key_id", "aws_secret_access_key",
               "aws_session_token", "session_token"}


def _secret_keys(options: Any, path: str = "") -> list[str]:
    """Names of credential-looking entries in (nested) storage options."""
    found = []
    if isinstance(options, dict):
        for k, v in options.items():
            name = f"{path}.{k}" if path else str(k)
            if str(k).lower() in SECRET_KEYS:
                found.append(name)
            found += _secret_keys(v, name)
    return found


def parse_schedule_args(argv: list[str] | None = None) -> ScheduleConfig:
    a = build_parser().parse_args(argv)
    for flag, opts in (("--storage-options", a.storage_options), ("--output-storage-options", a.output_storage_options)):
        if secrets := _secret_keys(opts):
            raise BadInput(f"{flag} holds credentials ({', '.join(secrets)}); the scheduler passes these options "
                             "on each run's command line (and into Ray job entrypoints), so give credentials through the "
                             "environment instead (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, an instance role, ...)")
    try:
        with open(a.config) as fh:
            run = yaml.safe_load(fh) or {}
    except FileNotFoundError:
        raise BadInput(f"no such config file: {a.config}") from None
    except yaml.YAMLError as e:
        raise BadInput(f"{a.config} is not valid YAML: {e}") from None
    if not isinstance(run, dict):
        raise BadInput(f"{a.config} must be a mapping of quantize settings")
    runtime_env = run.pop("runtime_env", None)
    cfg = ScheduleConfig(source=a.source, output=a.output, run=run, once=a.once, every_s=a.every or 0.0,
                         address=a.address, storage_options=a.storage_options,
                         output_storage_options=a.output_storage_options, lease_s=a.lease, runtime_env=runtime_env,
                         retry_backoff_s=a.retry_backoff)
    if a.owner:
        cfg.owner = a.owner
    return cfg


def main(argv: list[str] | None = None) -> int:
    cfg = parse_schedule_args(argv)
    try:
        scheduler = Scheduler(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return scheduler.loop()


if __name__ == "__main__":
    raise SystemExit(main())
