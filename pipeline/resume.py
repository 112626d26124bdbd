"""Per-block checkpoints and resume.

The output holds ``checkpoints/run.json`` (the run's settings and their fingerprint) from the
start, and ``checkpoints/block-NNNNN.json`` after each finished block (source fingerprint, output
shard name and checksum, losses, timings). A rerun of the same command continues after the last
block whose record and shard both check out; a rerun with other settings is refused with the
differences spelled out, unless ``--restart`` discards the old run.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from pipeline import storage
from pipeline.writer import OutputDir, sha256

RUN_RECORD = "checkpoints/run.json"
MANIFEST = "lsiq_manifest.json"


class ResumeMismatch(ValueError):
    """The output holds (part of) a run with different settings or a different source."""


BLOCK_RECORD_PREFIX = "checkpoints/block-"  # one record per finished block


def block_record_name(i: int) -> str:
    return f"{BLOCK_RECORD_PREFIX}{i:05d}.json"


def is_block_record(name: str) -> bool:
    """A finished block's record (not the temporary file of one being written, "<name>.tmp-<hex>")."""
    return name.startswith(BLOCK_RECORD_PREFIX) and name.endswith(".json")


def fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


@dataclass
class ResumeState:
    """What an output already holds for this run."""

    complete: bool = False
    records: list[dict[str, Any]] = field(default_factory=list)  # finished blocks 0..k-1, in order

    @property
    def next_block(self) -> int:
        return len(self.records)


def prepare(out: OutputDir, settings: dict[str, Any], num_layers: int, restart: bool) -> ResumeState:
    """Inspect the output, refuse a mismatched run, discard it on ``restart``, and return where to start."""
    files = out.listing()
    # temporary files of a write that a killed run left behind are never part of an output
    stale = [f for f in files if storage.TEMP_MARK in f.rsplit("/", 1)[-1]]
    if stale:
        out.remove(stale)
        files = [f for f in files if f not in stale]
    ours = [f for f in files if f == MANIFEST or f.endswith(".safetensors") or f.startswith("checkpoints/")]
    fp = fingerprint(settings)
    if ours and restart:
        # the manifest goes first so that the old run stops looking complete before anything else
        out.remove([f for f in ours if f == MANIFEST])
        out.remove([f for f in ours if f != MANIFEST])
        ours = []
    if not ours:
        out.makedirs()
        out.write_json(RUN_RECORD, {"fingerprint": fp, "settings": settings})
        return ResumeState()
    if RUN_RECORD not in ours:
        raise ResumeMismatch(f"output {out.url!r} holds files of another tool or run ({len(ours)} files) "
                             "but no checkpoints/run.json; choose another --output or pass --restart")
    old = out.read_json(RUN_RECORD)
    if old.get("fingerprint") != fp and not any(f == MANIFEST or is_block_record(f) for f in ours):
        # a run that finished no block holds nothing worth keeping: the new settings replace it
        out.remove(ours)
        out.write_json(RUN_RECORD, {"fingerprint": fp, "settings": settings})
        return ResumeState()
    if old.get("fingerprint") != fp:
        diff = _differences(old.get("settings", {}), settings)
        raise ResumeMismatch(f"output {out.url!r} holds a run with different settings ({'; '.join(diff)}); "
                             "rerun with the same settings to resume, or pass --restart to discard it")
    if MANIFEST in ours and out.read_json(MANIFEST).get("status") == "complete":
        return ResumeState(complete=True)
    records = []
    for i in range(num_layers):
        name = block_record_name(i)
        if name not in ours:
            break
        rec = out.read_json(name)
        files = rec.get("files") or []
        if rec.get("fingerprint") != fp or rec.get("index") != i or not files or any(f["file"] not in ours for f in files):
            break
        if any(sha256(out.read_bytes(f["file"])) != f["sha256"] for f in files):
            break  # a shard that does not match its record is redone
        records.append(rec)
    return ResumeState(records=records)
