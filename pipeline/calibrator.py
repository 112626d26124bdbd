"""The calibrator: a Ray actor that owns the activation caches and calibrates blocks in order.

It holds the caches of [nsamples, seqlen, hidden]: the quantized stream (inputs that the
already-quantized blocks produce) and the FP stream (inputs of the FP model). For block i it
computes the FP targets, calibrates, then advances both streams to block i+1's inputs. Above
``activation_budget`` bytes the caches live in memory-mapped files on local disk instead of RAM.
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from typing import Any

import ray
import torch
from transformers import AutoConfig

from lsiq.arch import BlockArch
from lsiq.block import CalibConfig, calibrate_block, forward_all
from pipeline import native_format
from pipeline.actors import peak_rss_bytes
from pipeline.checkpoint import layer_prefix
from pipeline.model_io import decoder_layer, decoder_layer_class

CACHES_AT_ONCE = 3  # FP targets, quantized inputs, and the next block's quantized inputs


class ActivationCache:
    """Allocates the [N, L, hidden] caches in RAM, or as files on local disk when they would
    exceed the budget. The files are unlinked as soon as they are mapped: the OS frees their space
    when the tensor goes, and a crash leaves nothing behind."""

    def __init__(self, budget_bytes: int | None, spill_dir: str | None) -> None:
        self.budget = budget_bytes
        self.spill_dir = spill_dir or tempfile.gettempdir()
        self.spilled = False

    def plan(self, one_cache_bytes: int) -> None:
        self.spilled = self.budget is not None and CACHES_AT_ONCE * one_cache_bytes > self.budget

    def empty_like(self, like: torch.Tensor) -> torch.Tensor:
        if not self.spilled:
            return torch.empty_like(like)
        os.makedirs(self.spill_dir, exist_ok=True)
        path = os.path.join(self.spill_dir, f"lsiq-activations-{uuid.uuid4().hex}.bin")
        t = torch.from_file(path, shared=True, size=like.numel(), dtype=like.dtype).view(like.shape)
        os.unlink(path)
        return t

    def copy(self, src: torch.Tensor) -> torch.Tensor:
        out = self.empty_like(src)
        out.copy_(src)
        return out


class BlockCalibrator:
    """Calibrates one block per call, in order; narrow methods, state = the activation caches."""

    def __init__(self, config_dict: dict[str, Any], calib_cfg: CalibConfig, device: str = "cpu",
                 num_threads: int | None = None, activation_budget: int | None = None,
                 spill_dir: str | None = None) -> None:
        if num_threads:
            torch.set_num_threads(num_threads)
        self.config = AutoConfig.for_model(**config_dict)
        self.arch = BlockArch.from_config(self.config)
        self.layer_cls = decoder_layer_class(self.config)
        self.cfg = calib_cfg
        self.device = torch.device(device)
        self.cache = ActivationCache(activation_budget, spill_dir)
        self.q_in: torch.Tensor | None = None
        self.fp_in: torch.Tensor | None = None
        self.kwargs: dict[str, Any] = {}
        self.position = -1  # the block whose inputs the caches hold; -1 = no inputs yet
        self.idle_since = time.perf_counter()

    def set_inputs(self, inputs: tuple[torch.Tensor, dict[str, Any]]) -> dict[str, Any]:
        """Start both streams from the embeddings' output (block 0's inputs)."""
        hidden, layer_kwargs = inputs
        hidden = hidden.to(torch.float32)
        self.cache.plan(hidden.numel() * hidden.element_size())
        self.q_in, self.fp_in = self.cache.copy(hidden), self.cache.copy(hidden)
        self.kwargs = _to_device(layer_kwargs, self.device)
        self.position = 0
        self.idle_since = time.perf_counter()
        one = hidden.numel() * hidden.element_size()
        return {"cache_bytes": one, "peak_cache_bytes": CACHES_AT_ONCE * one, "spilled": self.cache.spilled}

    def _check_position(self, index: int) -> None:
        if self.position != index:
            raise RuntimeError(f"calibrator holds the inputs of block {self.position}, was asked for block {index} "
                               "(a restarted calibrator needs set_inputs and a replay first)")

    def _layer(self, index: int, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
        tensors = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in tensors.items()}
        return decoder_layer(self.layer_cls, self.config, index, tensors).to(self.device)

    def calibrate(self, index: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
        """Calibrate block ``index`` from its FP tensors; returns its stored tensors and statistics.
        ``meta`` is the reader's record of the block (passed through to the writer)."""
        t0 = time.perf_counter()
        io_wait = t0 - self.idle_since  # idle time before this call could start: waiting on the reader
        self._check_position(index)
        layer = self._layer(index, tensors)
        bs = self.cfg.batch_size
        targets = forward_all(layer, self.fp_in, self.kwargs, bs, out=self.cache.empty_like(self.fp_in))
        result = calibrate_block(layer, self.kwargs, self.q_in, targets, self.arch, self.cfg, index,
                                 fp_inputs=self.fp_in)
        self.fp_in = None  # at most three caches at once: FP targets, quantized inputs, next inputs
        q_next = forward_all(layer, self.q_in, self.kwargs, bs, params=result.dequantized_params(),
                             abits=self.cfg.abits, out=self.cache.empty_like(self.q_in))
        self.fp_in, self.q_in = targets, q_next
        self.position = index + 1
        seconds = time.perf_counter() - t0
        self.idle_since = time.perf_counter()
        stats = {
            "index": index,
            "loss_before": result.loss_before,
            "loss_after": result.loss_after,
            "losses": result.losses,
            "trainable_params": result.trainable_params,
            "calib_seconds": result.seconds,
            "seconds": seconds,
            "io_wait_seconds": io_wait,
            "bytes_read": meta["bytes_read"],
            "read_seconds": meta["read_seconds"],
            "peak_rss_reader": meta["peak_rss_reader"],
            "peak_rss_calibrator": peak_rss_bytes(),
        }
        return {"tensors": native_format.block_tensors(layer_prefix(index), result),
                "source_fingerprint": meta["fingerprint"], "stats": stats}

    def replay(self, index: int, tensors: dict[str, torch.Tensor], stored: dict[str, torch.Tensor]) -> None:
        """Advance both streams through an already-finished block: the FP block for the FP stream,
        the stored quantized block (exactly the weights the original run used) for the other."""
        self._check_position(index)
        layer = self._layer(index, tensors)
        bs = self.cfg.batch_size
        prefix = layer_prefix(index)
        params = {k[len(prefix):]: v.to(self.device)
                  for k, v in native_format.dequantize_tensors(stored, self.cfg.spec).items()}
        targets = forward_all(layer, self.fp_in, self.kwargs, bs, out=self.cache.empty_like(self.fp_in))
        self.q_in = forward_all(layer, self.q_in, self.kwargs, bs, params=params, abits=self.cfg.abits,
                                out=self.cache.empty_like(self.q_in))
        self.fp_in = targets
        self.position = index + 1
        self.idle_since = time.perf_counter()

    def peak_rss(self) -> int:
        return peak_rss_bytes()

    def pid(self) -> int:
        return os.getpid()


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple | list):
        return type(obj)(_to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def remote_calibrator(config_dict: dict[str, Any], calib_cfg: CalibConfig, device: str, num_cpus: int,
                      num_gpus: int, activation_budget: int | None = None, spill_dir: str | None = None,
                      max_restarts: int = 3) -> ray.actor.ActorHandle:
    """Start the calibrator actor with explicit resources. Ray restarts its process if it dies
    (``max_restarts``); calls are not retried, because a restarted calibrator has lost its caches:
    the driver rebuilds them (set_inputs, then replay of the finished blocks) and redoes the block."""
    actor_cls = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=max_restarts,
                           max_task_retries=0)(BlockCalibrator)
    return actor_cls.remote(config_dict, calib_cfg, device, num_cpus, activation_budget, spill_dir)
