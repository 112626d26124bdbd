"""The output location: atomic shard and JSON writes, reads back for resume, and cleanup."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from pipeline import storage

# One metadata key only: safetensors writes its metadata map in hash order, so several keys would
# make the bytes differ between identical runs. The quantization settings live in the manifest.
SHARD_METADATA = {"format": "pt"}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class OutputDir:
    """A directory (any fsspec URL) that receives one run's files."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.fs, self.root = storage.filesystem(url)

    def path(self, name: str) -> str:
        return storage.join(self.root, name)

    def exists(self, name: str) -> bool:
        return self.fs.exists(self.path(name))

    def listing(self) -> list[str]:
        """Names (relative) of every file under the output, recursively."""
        if not self.fs.exists(self.root):
            return []
        prefix = self.root.rstrip("/") + "/"
        return sorted(p[len(prefix):] if p.startswith(prefix) else p for p in self.fs.find(self.root))

    def makedirs(self) -> None:
        self.fs.makedirs(self.root, exist_ok=True)

    def remove(self, names: list[str]) -> None:
        for n in names:
            if self.exists(n):
                self.fs.rm(self.path(n))

    def write_bytes(self, name: str, data: bytes) -> dict[str, Any]:
        if "/" in name:
            self.fs.makedirs(self.path(name.rsplit("/", 1)[0]), exist_ok=True)
        storage.write_bytes(self.fs, self.path(name), data)
        return {"file": name, "bytes": len(data), "sha256": sha256(data)}

    def write_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        return self.write_bytes(name, safetensors_save(tensors, metadata=SHARD_METADATA))

    def read_bytes(self, name: str) -> bytes:
        return self.fs.cat_file(self.path(name))

    def read_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return safetensors_load(self.read_bytes(name))

    def write_json(self, name: str, obj: Any) -> None:
        if "/" in name:
            self.fs.makedirs(self.path(name.rsplit("/", 1)[0]), exist_ok=True)
        storage.write_json(self.fs, self.path(name), obj)

    def read_json(self, name: str) -> Any:
        return storage.read_json(self.fs, self.path(name))
