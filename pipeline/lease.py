"""Leases in object storage: at most one scheduler works on a checkpoint at a time.

A lease is a sequence of immutable objects ``<dir>/<generation>.json`` (owner, token, expiry).
Taking, renewing and releasing a lease all create the next generation with an exclusive create
(S3 ``If-None-Match: *``, ``O_EXCL`` on a local filesystem), so of two schedulers racing for the
same generation exactly one wins; no object is ever overwritten, so no compare-and-swap is
needed. The latest generation rules: a scheduler may take the lease when that one has expired
(a dead owner) or was released. Expiry uses the schedulers' wall clocks: keep them in sync (NTP)
and the lease time far above any skew.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec

from pipeline import storage

GEN_DIGITS = 10


class LeaseLost(RuntimeError):
    """Another scheduler took the lease over (ours had expired)."""


@dataclass
class Lease:
    fs: fsspec.AbstractFileSystem
    dir: str
    owner: str
    ttl: float
    generation: int
    expires_at: float


def _name(gen: int) -> str:
    return f"{gen:0{GEN_DIGITS}d}.json"


def generations(fs: fsspec.AbstractFileSystem, lease_dir: str) -> list[int]:
    try:
        fs.invalidate_cache(lease_dir)
        names = storage.retrying(lambda: fs.ls(lease_dir, detail=False), f"list {lease_dir}")
    except FileNotFoundError:
        return []
    gens = []
    for n in names:
        base = n.rstrip("/").rsplit("/", 1)[-1]
        if base.endswith(".json") and base[:-5].isdigit():
            gens.append(int(base[:-5]))
    return sorted(gens)


def latest(fs: fsspec.AbstractFileSystem, lease_dir: str) -> tuple[int, dict[str, Any] | None]:
    """The newest generation and its record (0, None when there is none)."""
    gens = generations(fs, lease_dir)
    if not gens:
        return 0, None
    return gens[-1], storage.read_json(fs, storage.join(lease_dir, _name(gens[-1])))


def _create(fs: fsspec.AbstractFileSystem, lease_dir: str, gen: int, record: dict[str, Any]) -> bool:
    """Create generation ``gen`` exclusively; False when another writer created it first."""
    path = storage.join(lease_dir, _name(gen))
    data = json.dumps(record, sort_keys=True).encode()
    if storage.is_local(fs):
        return _create_local(path, data)
    for attempt in range(4):
        try:
            fs.pipe_file(path, data, mode="create")
            return True
        except Exception as e:  # noqa: BLE001 - the store's "already exists" has several spellings
            exists = isinstance(e, FileExistsError) or "pre-condition" in str(e).lower() \
                or "precondition" in str(e).lower()
            if not exists and not storage.is_transient(e):
                raise
            # Exists, or the request failed in flight: it may be our own write that landed.
            try:
                fs.invalidate_cache(path)
                current = json.loads(fs.cat_file(path))
            except FileNotFoundError:
                if exists:
                    raise
                time.sleep(0.25 * 2**attempt)
                continue
            return current.get("token") == record["token"]
    raise storage.StorageError(f"could not create lease object {path}")


def _create_local(path: str, data: bytes) -> bool:
    """Exclusive create with its content complete when it appears: write a temporary file, then
    hard-link it to the name (link fails if the name exists)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = storage.write_temp(path, data)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


def _record(owner: str, ttl: float, released: bool = False) -> dict[str, Any]:
    now = time.time()
    return {"owner": owner, "token": uuid.uuid4().hex, "acquired_at": now,
            "expires_at": now if released else now + ttl, "released": released}


def try_acquire(fs: fsspec.AbstractFileSystem, lease_dir: str, owner: str, ttl: float) -> Lease | None:
    """Take the lease if it is free (none yet, expired or released); None when someone holds it."""
    gen, rec = latest(fs, lease_dir)
    if rec is not None and not rec.get("released") and rec["expires_at"] > time.time():
        return None
    record = _record(owner, ttl)
    if not _create(fs, lease_dir, gen + 1, record):
        return None
    for old in generations(fs, lease_dir):  # keep the history short; losing this cleanup is harmless
        if old < gen:
            try:
                fs.rm(storage.join(lease_dir, _name(old)))
            except Exception:  # noqa: BLE001
                pass
    return Lease(fs, lease_dir, owner, ttl, gen + 1, record["expires_at"])


def renew(lease: Lease) -> None:
    """Extend the lease by its ttl; LeaseLost if another scheduler has taken it over."""
    record = _record(lease.owner, lease.ttl)
    if not _create(lease.fs, lease.dir, lease.generation + 1, record):
        raise LeaseLost(f"lease {lease.dir} was taken over by another scheduler")
    lease.generation += 1
    lease.expires_at = record["expires_at"]


def release(lease: Lease) -> None:
    """Give the lease up now (best effort: an unreleased lease simply expires)."""
    try:
        _create(lease.fs, lease.dir, lease.generation + 1, _record(lease.owner, 0.0, released=True))
    except Exception:  # noqa: BLE001
        pass
