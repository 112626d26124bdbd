"""The output location: atomic shard and JSON writes, reads back for resume, and cleanup."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import torch
from safetensors.torch import save as safetensors_save

from pipeline import storage

# One metadata key only: safetensors writes its metadata map in hash order, so several keys would
# make the bytes differ between identical runs. The quantization settings live in the manifest.
SHARD_METADATA = {"format": "pt"}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class OutputDir:
    """A directory (any fsspec URL) that receives one run's files."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url
        self.fs, self.root = storage.filesystem(url, storage_options)

    def _parent(self, name: str) -> None:
        if "/" in name and storage.is_local(self.fs):  # object stores have no directories to make
            self.fs.makedirs(self.path(name.rsplit("/", 1)[0]), exist_ok=True)

    def path(self, name: str) -> str:
        return storage.join(self.root, name)

    def exists(self, name: str) -> bool:
        return storage.exists(self.fs, self.path(name))

    def listing(self) -> list[str]:
        """Names (relative) of every file under the output, recursively."""
        self.fs.invalidate_cache(self.root)
        if not storage.exists(self.fs, self.root):
            return []
        prefix = self.root.rstrip("/") + "/"
        found = storage.retrying(lambda: self.fs.find(self.root), f"list {self.url}")
        return sorted(p[len(prefix):] if p.startswith(prefix) else p for p in found)

    def check_writable(self) -> None:
        """A local output must be a folder (or not exist yet) under a folder this process may write in;
        checked before a run writes anything, so the user reads the path, not an errno."""
        if not storage.is_local(self.fs):
            return  # object stores answer for themselves (credentials, bucket) on the first write
        path = os.path.abspath(self.root)
        if os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"--output {self.url} is a file, not a folder: choose a folder for the quantized model")
        parent = path
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise ValueError(f"--output {self.url} lies under {parent}, which is a file, not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ValueError(f"--output {self.url}: this user may not write in {parent}")

    def makedirs(self) -> None:
        if storage.is_local(self.fs):
            self.fs.makedirs(self.root, exist_ok=True)

    def remove(self, names: list[str]) -> None:
        for n in names:
            if self.exists(n):
                storage.retrying(lambda n=n: self.fs.rm(self.path(n)), f"remove {self.path(n)}")

    def write_bytes(self, name: str, data: bytes) -> dict[str, Any]:
        self._parent(name)
        storage.write_bytes(self.fs, self.path(name), data)
        return {"file": name, "bytes": len(data), "sha256": sha256(data)}

    def write_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        return self.write_bytes(name, safetensors_save(tensors, metadata=SHARD_METADATA))

    def read_bytes(self, name: str) -> bytes:
        return storage.read_all(self.fs, self.path(name))

    def write_json(self, name: str, obj: Any) -> None:
        self._parent(name)
        storage.write_json(self.fs, self.path(name), obj)

    def read_json(self, name: str) -> Any:
        return storage.read_json(self.fs, self.path(name))


def split_shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Split ``tensors`` (in name order) into groups of at most ``max_bytes`` each (a tensor larger
    than the cap gets a group of its own); ``max_bytes <= 0`` means one group."""
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        if max_bytes > 0 and groups[-1] and size + nbytes > max_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = t
        size += nbytes
    return groups
