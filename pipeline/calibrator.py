"""The calibrator: a Ray actor that owns the activation caches and calibrates blocks in order.

It holds two caches of [nsamples, seqlen, hidden]: the quantized stream (inputs that the
already-quantized blocks produce) and the FP stream (inputs of the FP model). For block i it
computes the FP targets, calibrates, then advances both streams to block i+1's inputs.
"""

from __future__ import annotations

import resource
import time
from typing import Any

import ray
import torch
from transformers import AutoConfig

from lsiq.arch import BlockArch
from lsiq.block import CalibConfig, calibrate_block, forward_all
from pipeline import native_format
from pipeline.checkpoint import layer_prefix
from pipeline.model_io import decoder_layer, decoder_layer_class


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class BlockCalibrator:
    """Calibrates one block per call; narrow methods, state = the two activation caches."""

    def __init__(self, config_dict: dict[str, Any], calib_cfg: CalibConfig, device: str = "cpu",
                 num_threads: int | None = None) -> None:
        if num_threads:
            torch.set_num_threads(num_threads)
        self.config = AutoConfig.for_model(**config_dict)
        self.arch = BlockArch.from_config(self.config)
        self.layer_cls = decoder_layer_class(self.config)
        self.cfg = calib_cfg
        self.device = torch.device(device)
        self.q_in: torch.Tensor | None = None
        self.fp_in: torch.Tensor | None = None
        self.kwargs: dict[str, Any] = {}

    def set_inputs(self, hidden: torch.Tensor, layer_kwargs: dict[str, Any]) -> int:
        """Start both streams from the embeddings; returns the cache bytes held."""
        self.q_in = hidden.to(torch.float32).clone()
        self.fp_in = hidden.to(torch.float32).clone()
        self.kwargs = _to_device(layer_kwargs, self.device)
        return 2 * self.q_in.numel() * self.q_in.element_size()

    def calibrate(self, index: int, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Calibrate block ``index`` from its FP tensors; return its stored tensors and statistics."""
        if self.q_in is None:
            raise RuntimeError("set_inputs must be called before calibrate")
        t0 = time.perf_counter()
        layer = decoder_layer(self.layer_cls, self.config, index, tensors).to(self.device)
        bs = self.cfg.batch_size
        targets = forward_all(layer, self.fp_in, self.kwargs, bs)
        result = calibrate_block(layer, self.kwargs, self.q_in, targets, self.arch, self.cfg, index,
                                 fp_inputs=self.fp_in)
        self.fp_in = None  # at most three caches at once: FP targets, quantized inputs, next inputs
        q_next = forward_all(layer, self.q_in, self.kwargs, bs, params=result.dequantized_params(),
                             abits=self.cfg.abits)
        self.fp_in, self.q_in = targets, q_next
        return {
            "index": index,
            "tensors": native_format.block_tensors(layer_prefix(index), result),
            "loss_before": result.loss_before,
            "loss_after": result.loss_after,
            "losses": result.losses,
            "trainable_params": result.trainable_params,
            "calib_seconds": result.seconds,
            "seconds": time.perf_counter() - t0,
            "peak_rss": peak_rss_bytes(),
        }

    def replay(self, index: int, tensors: dict[str, torch.Tensor], stored: dict[str, torch.Tensor]) -> None:
        """Advance both streams through an already-finished block: the FP block for the FP stream,
        the stored quantized block (exactly the weights the original run used) for the other."""
        layer = decoder_layer(self.layer_cls, self.config, index, tensors).to(self.device)
        bs = self.cfg.batch_size
        prefix = layer_prefix(index)
        params = {k[len(prefix):]: v.to(self.device)
                  for k, v in native_format.dequantize_tensors(stored, self.cfg.spec).items()}
        targets = forward_all(layer, self.fp_in, self.kwargs, bs)
        self.q_in = forward_all(layer, self.q_in, self.kwargs, bs, params=params, abits=self.cfg.abits)
        self.fp_in = targets

    def peak_rss(self) -> int:
        return peak_rss_bytes()


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple | list):
        return type(obj)(_to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def remote_calibrator(config_dict: dict[str, Any], calib_cfg: CalibConfig, device: str, num_cpus: int,
                      num_gpus: int) -> ray.actor.ActorHandle:
    """Start the calibrator actor with explicit resources; Ray restarts it if its process dies."""
    actor_cls = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(BlockCalibrator)
    return actor_cls.remote(config_dict, calib_cfg, device, num_cpus)
