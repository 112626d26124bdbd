"""The I/O actors of the block DAG: a reader that fetches one block's source tensors, and a
writer that streams one calibrated block to the output and records its checkpoint.

Both are stateless apart from their open filesystem, so Ray may restart them and retry their
calls freely (reads are pure, writes are idempotent: same name, same bytes).
"""

from __future__ import annotations

import resource
import time
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load as safetensors_load

from pipeline import resume
from pipeline.checkpoint import Checkpoint
from pipeline.writer import OutputDir, sha256, split_shards

if TYPE_CHECKING:  # Ray is imported where it is used: the reader and writer classes run without it
    import ray


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def block_shard_names(i: int, parts: int) -> list[str]:
    if parts == 1:
        return [f"model-layers-{i:05d}.safetensors"]
    return [f"model-layers-{i:05d}-{p + 1:05d}-of-{parts:05d}.safetensors" for p in range(parts)]


class BlockReader:
    """Reads block i of a source checkpoint: only its tensors, as byte ranges (headers parsed once,
    by the driver's :class:`Checkpoint` that this actor receives)."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.ckpt = checkpoint

    def read(self, i: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """(metadata, tensors): tensors keep the source dtype (the calibrator casts), so the object
        store carries no more bytes than storage did."""
        t0 = time.perf_counter()
        names = self.ckpt.block_names(i)
        tensors, fp = self.ckpt.read_with_fingerprint(names, dtype=None)
        prefix = f"model.layers.{i}."
        meta = {"index": i, "fingerprint": fp, "bytes_read": self.ckpt.nbytes(names),
                "read_seconds": time.perf_counter() - t0, "peak_rss_reader": peak_rss_bytes()}
        return meta, {n[len(prefix):]: t for n, t in tensors.items()}


class BlockWriter:
    """Writes a calibrated block's shard(s) (verified), then its checkpoint record, and reads
    finished blocks back for a resumed run's replay."""

    def __init__(self, url: str, storage_options: dict[str, Any], run_fingerprint: str, max_shard_bytes: int) -> None:
        self.out = OutputDir(url, storage_options)
        self.fp = run_fingerprint
        self.max_shard_bytes = max_shard_bytes

    def write(self, i: int, result: dict[str, Any]) -> dict[str, Any]:
        """Store block i; returns its checkpoint record (shard names, checksums, statistics)."""
        t0 = time.perf_counter()
        groups = split_shards(result["tensors"], self.max_shard_bytes)
        files, weight_map = [], {}
        for name, group in zip(block_shard_names(i, len(groups)), groups, strict=True):
            files.append(self.out.write_tensors(name, group))
            weight_map.update({k: name for k in group})
        stats = dict(result["stats"]) | {
            "bytes_written": sum(f["bytes"] for f in files),
            "write_seconds": time.perf_counter() - t0,
            "peak_rss_writer": peak_rss_bytes(),
        }
        record = {"index": i, "fingerprint": self.fp, "source_fingerprint": result["source_fingerprint"],
                  "files": files, "weight_map": weight_map, "stats": stats}
        # the record goes after the shards: a record always points at whole, verified shards
        self.out.write_json(resume.block_record_name(i), record)
        return record

    def read_block(self, record: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The stored tensors of a finished block, checked against its record's checksums."""
        tensors: dict[str, torch.Tensor] = {}
        for f in record["files"]:
            data = self.out.read_bytes(f["file"])
            if sha256(data) != f["sha256"]:
                raise resume.ResumeMismatch(f"{f['file']} changed since its checkpoint record was written; pass --restart")
            tensors.update(safetensors_load(data))
        return tensors


def remote_reader(checkpoint: Checkpoint) -> ray.actor.ActorHandle:
    import ray

    # I/O bound: no CPU reserved, so it runs beside the calibrator; pure reads may be retried.
    cls = ray.remote(num_cpus=0, max_restarts=3, max_task_retries=3)(BlockReader)
    return cls.remote(checkpoint)


def remote_writer(url: str, storage_options: dict[str, Any], run_fingerprint: str,
                  max_shard_bytes: int) -> ray.actor.ActorHandle:
    import ray

    cls = ray.remote(num_cpus=0, max_restarts=3, max_task_retries=3)(BlockWriter)
    return cls.remote(url, storage_options, run_fingerprint, max_shard_bytes)
