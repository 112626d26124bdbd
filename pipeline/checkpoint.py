"""Reading a sharded safetensors checkpoint one block at a time.

Each shard's header (8-byte little-endian length, then JSON) is parsed once; a tensor is read as a
byte range, so only the requested block's tensors are fetched, whatever the shard layout. Sizes,
dtypes and shapes are checked against the header, the file size and the model config.
"""

from __future__ import annotations

import hashlib
import json
import struct
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig

from lsiq.archs import BlockArch
from pipeline import storage
from pipeline.source_quant import FLOAT8, SourceQuant, SourceQuantError, is_aux

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, **FLOAT8,
}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """The source checkpoint is missing something or is inconsistent."""


@dataclass(frozen=True)
class TensorInfo:
    shard: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the shard file
    end: int


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


class Checkpoint:
    """A source checkpoint: its config, the location of every tensor, and block-wise reads."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url
        try:
            self.fs, self.root = storage.filesystem(url, storage_options)
        except Exception as e:  # noqa: BLE001 - any fsspec failure is the user's URL problem
            raise CheckpointError(f"cannot open model location {url!r}: {e}") from e
        self.storage_options = storage_options or {}
        cfg_path = storage.join(self.root, "config.json")
        try:
            found = storage.exists(self.fs, cfg_path)
        except PermissionError as e:
            raise CheckpointError(f"access to {url!r} refused (check the credentials): {e}") from e
        except OSError as e:
            raise CheckpointError(f"cannot reach model location {url!r}: {e}") from e
        if not found:
            raise CheckpointError(f"no config.json in {url!r}: not a transformers checkpoint directory")
        cfg = storage.read_json(self.fs, cfg_path)
        if "model_type" not in cfg:
            raise CheckpointError(f"{cfg_path} has no model_type")
        self.config_dict = cfg
        try:  # an FP8 source is read as full precision (pipeline.source_quant); other quantized ones refused
            self.source_quant = SourceQuant.from_config(cfg)
        except SourceQuantError as e:
            raise CheckpointError(f"{cfg_path}: {e}") from None
        # the model as calibrated and written: full precision, whatever the source's storage
        self.model_config_dict = {k: v for k, v in cfg.items() if k != "quantization_config"}
        self.config: PretrainedConfig = AutoConfig.for_model(**self.model_config_dict)
        self.arch = BlockArch.from_config(self.config)
        self.tensors = self._locate_tensors()

    # ------------------------------------------------------------------ layout
    def _shard_names(self) -> list[str]:
        index = storage.join(self.root, INDEX_FILE)
        if storage.exists(self.fs, index):
            weight_map = storage.read_json(self.fs, index).get("weight_map")
            if not weight_map:
                raise CheckpointError(f"{INDEX_FILE} has no weight_map")
            return sorted(set(weight_map.values()))
        if storage.exists(self.fs, storage.join(self.root, SINGLE_FILE)):
            return [SINGLE_FILE]
        raise CheckpointError(f"no {INDEX_FILE} or {SINGLE_FILE} in {self.url!r}")

    def _locate_tensors(self) -> dict[str, TensorInfo]:
        out: dict[str, TensorInfo] = {}
        for shard in self._shard_names():
            path = storage.join(self.root, shard)
            if not storage.exists(self.fs, path):
                raise CheckpointError(f"missing shard {shard} listed in {INDEX_FILE}")
            size = storage.retrying(lambda p=path: self.fs.size(p), f"size of {path}")
            if size < 8:
                raise CheckpointError(f"shard {shard} is truncated ({size} bytes)")
            (n,) = struct.unpack("<Q", storage.read_range(self.fs, path, 0, 8))
            if n > size - 8 or n > 100 * 2**20:
                raise CheckpointError(f"shard {shard}: header length {n} does not fit the file size {size}")
            try:
                header = json.loads(storage.read_range(self.fs, path, 8, 8 + n))
            except ValueError as e:
                raise CheckpointError(f"shard {shard}: unreadable safetensors header ({e})") from None
            header.pop("__metadata__", None)
            data_end = 8 + n
            for name, meta in header.items():
                begin, end = meta["data_offsets"]
                if meta["dtype"] not in DTYPES:
                    raise CheckpointError(f"{name} in {shard}: unsupported dtype {meta['dtype']}")
                numel = 1
                for d in meta["shape"]:
                    numel *= d
                if end - begin != numel * DTYPES[meta["dtype"]].itemsize:
                    raise CheckpointError(f"{name} in {shard}: byte range disagrees with dtype and shape")
                if data_end + end > size:
                    raise CheckpointError(f"shard {shard} is truncated: {name} ends at byte {data_end + end}, "
                                          f"file has {size}")
                out[name] = TensorInfo(shard, meta["dtype"], tuple(meta["shape"]), data_end + begin, data_end + end)
        self._check_float8(out)
        self._check_blocks(out)
        return out

    def _check_float8(self, tensors: dict[str, TensorInfo]) -> None:
        """Every float8 tensor is a weight whose scales the source's quantization_config locates."""
        for name, info in tensors.items():
            if info.dtype not in FLOAT8:
                continue
            if self.source_quant is None:
                raise CheckpointError(f"{name} in {info.shard} is {info.dtype} but config.json declares no "
                                      "quantization_config: its scales are unknown")
            scale = self.source_quant.scale_name(name) if name.endswith(".weight") else None
            if scale is None or scale not in tensors:
                raise CheckpointError(f"{name} in {info.shard} is {info.dtype} without its scales "
                                      f"({scale or 'not a .weight'}); the source's quantization_config says "
                                      f"{self.source_quant.method}")

    def _check_blocks(self, tensors: dict[str, TensorInfo]) -> None:
        """Every block holds every tensor its architecture's decoder layer has (the descriptor's
        linears, norms, q/k norms, biases), with the shapes the config implies, in floats. A
        mixture-of-experts block's routed experts may be stored one linear per expert and role (the
        Hub's layout) or fused as the module holds them (lsiq.expert_layout)."""
        for i in range(self.arch.num_layers):
            arch = self.arch.for_layer(i)
            linears = {f"{n}.weight" for n in arch.linears}
            if arch.moe:  # the experts' fused weights hold linears too
                ex = arch.family.experts
                linears |= {f"{ex.module}.{param}" for param in ex.linears}
            p = layer_prefix(i)
            for module_name, layouts in arch.checkpoint_layouts().items():
                found = [sum(f"{p}{n}" in tensors for n in alt) for alt in layouts]
                best = layouts[max(range(len(layouts)), key=lambda k: (found[k] == len(layouts[k]), found[k], -k))]
                quantized = module_name in linears
                for name, shape in best.items():
                    self._check_tensor(tensors, arch, p, name, shape, quantized and not name.endswith("bias"), layouts)

    def _check_tensor(self, tensors: dict[str, TensorInfo], arch: BlockArch, p: str, name: str, shape: tuple[int, ...],
                      is_linear: bool, layouts: list[dict[str, tuple[int, ...]]]) -> None:
        info = tensors.get(f"{p}{name}")
        if info is None:
            other = [next(iter(alt)) for alt in layouts if name not in alt][:1]
            alt = f"; or {p}{other[0]} and the rest of that layout" if other else ""
            raise CheckpointError(f"missing tensor {p}{name} (the {arch.name} block of model_type "
                                  f"{arch.model_type!r} has it{alt})")
        if info.shape != tuple(shape):
            what = "config implies" if is_linear else "expected"
            raise CheckpointError(f"{p}{name} has shape {list(info.shape)}, {what} {list(shape)}")
        if not DTYPES[info.dtype].is_floating_point:  # found here, not when its block is calibrated
            if is_linear:
                raise CheckpointError(f"{p}{name} in {info.shard} has dtype {info.dtype}: a full-precision "
                                      "checkpoint (F32, F16, BF16) is needed; is it already quantized?")
            raise CheckpointError(f"{p}{name} in {info.shard} has dtype {info.dtype}, not a float")

    # ------------------------------------------------------------------ reads
    def block_names(self, i: int) -> list[str]:
        """Block i's tensors as the full-precision model names them (an FP8 source's scales left out)."""
        p = layer_prefix(i)
        return sorted(n for n in self.tensors if n.startswith(p) and not self._aux(n))

    def other_names(self) -> list[str]:
        return sorted(n for n in self.tensors if not n.startswith("model.layers.") and not self._aux(n))

    def nbytes(self, names: list[str]) -> int:
        """Bytes read for ``names``: the scales of an FP8 source's weights included."""
        return sum(self.tensors[n].end - self.tensors[n].begin for n in self._with_scales(names))

    def _aux(self, name: str) -> bool:
        return self.source_quant is not None and is_aux(name)

    def _with_scales(self, names: list[str]) -> list[str]:
        """``names`` plus the scale tensor of each float8 weight among them."""
        extra = [self.source_quant.scale_name(n) for n in names
                 if n in self.tensors and self.tensors[n].dtype in FLOAT8]
        return list(names) + extra

    def read(self, names: list[str], dtype: torch.dtype | None = torch.float32) -> dict[str, torch.Tensor]:
        """Read the named tensors (byte ranges), check they are finite, cast floats to ``dtype``."""
        return self.read_with_fingerprint(names, dtype)[0]

    def read_with_fingerprint(self, names: list[str], dtype: torch.dtype | None = torch.float32
                              ) -> tuple[dict[str, torch.Tensor], str]:
        """Like :meth:`read`, plus a fingerprint of the source bytes (names, dtypes, shapes, data)."""
        out = {}
        digests: dict[str, str] = {}
        by_shard: dict[str, list[str]] = {}
        wanted = names
        names = self._with_scales(names)
        for n in names:
            if n not in self.tensors:
                raise CheckpointError(f"missing tensor {n}")
            by_shard.setdefault(self.tensors[n].shard, []).append(n)
        for shard, shard_names in by_shard.items():
            path = storage.join(self.root, shard)
            # one ranged request per run of adjacent tensors (a block is usually contiguous in a shard)
            for run in _contiguous_runs(sorted(shard_names, key=lambda k: self.tensors[k].begin), self.tensors):
                start, end = self.tensors[run[0]].begin, self.tensors[run[-1]].end
                try:
                    buf = storage.read_range(self.fs, path, start, end)
                except EOFError:
                    raise CheckpointError(f"shard {shard} is truncated while reading {run[0]}") from None
                view = memoryview(buf)
                for n in run:
                    info = self.tensors[n]
                    raw = view[info.begin - start:info.end - start]  # no copy
                    digests[n] = hashlib.sha256(raw).hexdigest()
                    out[n] = _to_tensor(n, raw, info, dtype)
                del view
                del buf
        for n in wanted:  # an FP8 source's weights, dequantized with their scales (read above)
            if self.tensors[n].dtype in FLOAT8:
                scale = out.pop(self.source_quant.scale_name(n))
                try:
                    w = self.source_quant.dequantize(n, out[n], scale)
                except SourceQuantError as e:
                    raise CheckpointError(str(e)) from None
                out[n] = w.to(dtype) if dtype is not None else w
        summary = [(n, self.tensors[n].dtype, list(self.tensors[n].shape), digests[n]) for n in sorted(digests)]
        return out, hashlib.sha256(json.dumps(summary).encode()).hexdigest()[:16]

    def read_block(self, i: int) -> tuple[dict[str, torch.Tensor], str]:
        """Block i's tensors (names relative to the block, ``self_attn.q_proj.weight``, fp32) and
        the fingerprint of their source bytes."""
        p = layer_prefix(i)
        tensors, fp = self.read_with_fingerprint(self.block_names(i))
        return {n[len(p):]: t for n, t in tensors.items()}, fp


def _contiguous_runs(names: list[str], tensors: dict[str, TensorInfo], max_bytes: int = 1 << 30) -> list[list[str]]:
    """Group tensors (sorted by offset) into runs whose byte ranges touch, capped at ``max_bytes``."""
    runs: list[list[str]] = []
    for n in names:
        info = tensors[n]
        if runs:
            last = tensors[runs[-1][-1]]
            first = tensors[runs[-1][0]]
            if info.begin == last.end and info.end - first.begin <= max_bytes:
                runs[-1].append(n)
                continue
        runs.append([n])
    return runs


def _to_tensor(name: str, raw: memoryview, info: TensorInfo, dtype: torch.dtype | None) -> torch.Tensor:
    """The tensor in ``raw`` (checked finite), cast to ``dtype`` if it is a float; one copy at most."""
    src = DTYPES[info.dtype]
    if not len(raw):
        return torch.empty(info.shape, dtype=src)
    if info.dtype in FLOAT8:  # no isfinite for float8: cast first (float32; the scales multiply in float32)
        dtype = torch.float32
    cast = dtype is not None and src.is_floating_point and src != dtype
    if cast:
        with warnings.catch_warnings():  # read-only view of the buffer: the cast below makes the copy
            warnings.simplefilter("ignore", UserWarning)
            t = torch.frombuffer(raw, dtype=src).reshape(info.shape)
    else:
        t = torch.frombuffer(bytearray(raw), dtype=src).reshape(info.shape)
    if info.dtype in FLOAT8:
        t = t.to(dtype)
        cast = False
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise CheckpointError(f"tensor {name} contains NaN or Inf values")
    return t.to(dtype) if cast else t
