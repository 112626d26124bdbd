"""Storage I/O through fsspec: plain paths and URLs (``s3://``, ``gs://``, ``file://``).

Writes never leave an object a later run would trust: on local filesystems they go to a temporary
name that is renamed into place; on object stores (whose PUT is all-or-nothing) the object is
verified after the write (size, then MD5 ETag or a read-back checksum). Transient errors (503s,
dropped connections, timeouts) are retried with exponential backoff; permanent ones (missing
object, refused credentials) surface at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

T = TypeVar("T")
VERIFY_CHUNK = 16 * 2**20
# Defaults, overridable per process (read at each call): attempts = RETRIES + 1, waits 0.25, 0.5, 1, ... s.
RETRIES_ENV, BACKOFF_ENV = "LSIQ_STORAGE_RETRIES", "LSIQ_STORAGE_BACKOFF"
# Errors that retrying cannot fix: the object is not there, or we may not touch it.
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)


class MissingCredentials(PermissionError):
    """An object store asked for credentials and none were found (environment, profile, options)."""


def _credential_errors() -> tuple[type[BaseException], ...]:
    try:
        import botocore.exceptions as b

        return (b.NoCredentialsError, b.PartialCredentialsError)
    except ImportError:  # pragma: no cover - s3fs is a dependency
        return ()


CREDENTIAL_ERRORS = _credential_errors()


class StorageError(OSError):
    """A storage operation failed for good (after retries), with the URL and the cause."""


def _transient_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [OSError, ConnectionError, TimeoutError]
    try:  # the S3 stack's own connection errors, when s3fs is in use
        import aiohttp
        import botocore.exceptions

        types += [aiohttp.ClientError, botocore.exceptions.BotoCoreError]
    except ImportError:  # pragma: no cover - s3fs is a dependency
        pass
    return tuple(types)


TRANSIENT = _transient_types()


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, TRANSIENT) and not isinstance(exc, PERMANENT + CREDENTIAL_ERRORS)


def retrying(fn: Callable[[], T], what: str, retries: int | None = None, backoff: float | None = None) -> T:
    """Call ``fn``; on a transient error wait ``backoff * 2**attempt`` seconds and try again."""
    retries = int(os.environ.get(RETRIES_ENV, "6")) if retries is None else retries
    backoff = float(os.environ.get(BACKOFF_ENV, "0.25")) if backoff is None else backoff
    for attempt in range(retries + 1):
        try:
            return fn()
        except CREDENTIAL_ERRORS as e:  # retrying finds no credentials either: say what to set, at once
            raise MissingCredentials(f"{what}: no credentials found ({e}); set AWS_ACCESS_KEY_ID and "
                                     "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or pass key and secret in "
                                     "--storage-options") from e
        except Exception as e:
            if not is_transient(e):
                raise
            if attempt == retries:
                raise StorageError(f"{what}: still failing after {retries + 1} attempts: {type(e).__name__}: {e}") from e
            time.sleep(backoff * 2**attempt)
    raise AssertionError("unreachable")


def filesystem(url: str, options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and path of ``url``; ``options`` go to fsspec (endpoint URL, credentials, ...)."""
    return fsspec.core.url_to_fs(url, **(options or {}))


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts)


def read_range(fs: fsspec.AbstractFileSystem, path: str, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of ``path`` in one ranged request, retried; short reads are errors."""
    data = retrying(lambda: fs.cat_file(path, start=start, end=end), f"read {path} [{start}, {end})")
    if len(data) != end - start:
        raise EOFError(f"{path}: asked for bytes [{start}, {end}), got {len(data)}: the object is shorter")
    return data


def read_all(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    return retrying(lambda: fs.cat_file(path), f"read {path}")


def exists(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    return retrying(lambda: fs.exists(path), f"look up {path}")


def _verify(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Check a just-written object: size, then its MD5 ETag when it has one (single-part PUT),
    else a read-back SHA-256."""
    fs.invalidate_cache(path)
    info = fs.info(path)
    if info.get("size") != len(data):
        raise OSError(f"{path}: wrote {len(data)} bytes, the store holds {info.get('size')}")
    etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
    if etag and "-" not in etag and len(etag) == 32:
        if etag != hashlib.md5(data).hexdigest():
            raise OSError(f"{path}: stored object's MD5 {etag} differs from the data written")
        return
    # multipart upload: read back in 16 MiB pieces (not the whole object at once) and compare digests
    h = hashlib.sha256()
    with fs.open(path, "rb", block_size=VERIFY_CHUNK, cache_type="none") as f:
        while chunk := f.read(VERIFY_CHUNK):
            h.update(chunk)
    if h.digest() != hashlib.sha256(data).digest():
        raise OSError(f"{path}: stored object differs from the data written")


TEMP_MARK = ".tmp-"  # local temporary files are "<name>.tmp-<8 hex>" (pipeline.resume removes leftovers)


def write_temp(path: str, data: bytes) -> str:
    """Write ``data`` durably (fsync) to a new temporary file beside local ``path``; returns its name,
    for the caller to move into place. A failed write (a full disk) removes its temporary file and
    names the path."""
    tmp = f"{path}{TEMP_MARK}{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise OSError(e.errno, f"cannot write {path} ({len(data):,} bytes): {e.strerror}") from e
    return tmp


def write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that no half-written object is ever visible as complete."""
    if is_local(fs):
        os.replace(write_temp(path, data), path)
        return

    def put_and_verify() -> None:
        fs.pipe_file(path, data)
        _verify(fs, path, data)

    retrying(put_and_verify, f"write {path}")


def write_json(fs: fsspec.AbstractFileSystem, path: str, obj: Any) -> None:
    write_bytes(fs, path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    """The JSON object in ``path``; a file that does not parse is named in the error."""
    try:
        return json.loads(read_all(fs, path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
