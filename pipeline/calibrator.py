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
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoConfig

from lsiq import methods
from lsiq.archs import BlockArch
from lsiq.block import calibrate_block
from lsiq.capture import LayerInputs
from lsiq.config import CalibConfig
from lsiq.forward import WithInputs, forward_all, stream_errors
from lsiq.moe import write_linears
from lsiq.parallel import SampleShard, shard_range
from pipeline import formats
from pipeline.actors import peak_rss_bytes
from pipeline.checkpoint import layer_prefix
from pipeline.model_io import decoder_layer, decoder_layer_class, prepare

if TYPE_CHECKING:  # Ray is imported where it is used: the calibrator's device code runs without it
    import ray

CACHES_AT_ONCE = 3  # FP targets, quantized inputs, and the next block's quantized inputs


class ActivationCache:
    """Allocates the [N, L, hidden] caches in RAM, or as files on local disk when they would
    exceed the budget. The files are unlinked as soon as they are mapped: the OS frees their space
    when the tensor goes, and a crash leaves nothing behind."""

    def __init__(self, budget_bytes: int | None, spill_dir: str | None) -> None:
        self.budget = budget_bytes
        self.spill_dir = spill_dir or tempfile.gettempdir()
        self.spilled = False

    def plan(self, one_cache_bytes: int, caches: int = CACHES_AT_ONCE) -> None:
        self.spilled = self.budget is not None and caches * one_cache_bytes > self.budget

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
    """Calibrates one block per call, in order; narrow methods, state = the activation caches.

    With several workers (data parallel), each holds the caches of its own samples (``owned``,
    global indices, of ``total``) for the whole run, and the workers sum their gradients and
    statistics with torch.distributed (gloo on CPU, nccl on GPU) at every optimizer step.
    """

    def __init__(self, config_dict: dict[str, Any], calib_cfg: CalibConfig, device: str = "cpu",
                 num_threads: int | None = None, activation_budget: int | None = None,
                 spill_dir: str | None = None, rank: int = 0, world: int = 1,
                 owned: list[int] | None = None, total: int = 0, fmt: str = "native") -> None:
        if num_threads:
            torch.set_num_threads(num_threads)
        self.config = prepare(AutoConfig.for_model(**config_dict))
        self.arch = BlockArch.from_config(self.config)
        self.layer_cls = decoder_layer_class(self.config)
        self.cfg = calib_cfg
        self.fmt = formats.get(fmt).NAME  # the output format: its stored weights feed the next block
        self.device = torch.device(device)
        self.cache = ActivationCache(activation_budget, spill_dir)
        self.q_in: torch.Tensor | None = None
        self.fp_in: torch.Tensor | None = None
        self.inputs: LayerInputs | None = None  # what the model passes each layer besides its hidden states
        self.position = -1  # the block whose inputs the caches hold; -1 = no inputs yet
        self.idle_since = time.perf_counter()
        self.rank, self.world = rank, world
        self.owned, self.total = owned, total
        # OAC (method "oac"): boundary activations of the FP model during its forward pass, then
        # dL/d(output of block i) for every block, from the streamed backward pass (lsiq.oac)
        self.oac_h: dict[int, torch.Tensor] = {}
        self.oac_g: dict[int, torch.Tensor] = {}

    # ------------------------------------------------------------------ data parallel
    def rendezvous(self) -> tuple[str, int]:
        """(address, free port) on this worker's node for the process group's TCP store (rank 0)."""
        import socket

        import ray

        addr = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((addr, 0))
            return addr, s.getsockname()[1]

    def join_group(self, addr: str, port: int, timeout_s: float = 120.0, backend: str | None = None) -> int:
        """Join (or rejoin, after a restart elsewhere) the workers' process group; ``backend``
        defaults to nccl on a GPU, gloo on a CPU (gloo also takes CUDA tensors, through the host)."""
        import datetime

        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        backend = backend or ("nccl" if self.device.type == "cuda" else "gloo")
        dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=self.rank, world_size=self.world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        return self.rank

    def _shard(self) -> SampleShard | None:
        if self.world == 1:
            return None
        import torch.distributed as dist

        device = self.device

        def all_reduce(t: torch.Tensor, op: str) -> None:
            buf = t.to(device) if device.type == "cuda" else t
            dist.all_reduce(buf, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
            if buf is not t:
                t.copy_(buf)

        def broadcast(t: torch.Tensor, src: int) -> None:
            if not t.is_contiguous():  # gloo sends a strided tensor's raw memory as if it were row-major
                raise ValueError("broadcast needs a contiguous tensor")
            buf = t.to(device) if device.type == "cuda" else t
            dist.broadcast(buf, src=src)
            if buf is not t:
                t.copy_(buf)

        return SampleShard(self.owned, self.total, all_reduce, rank=self.rank, world=self.world, broadcast=broadcast)

    def state(self) -> dict[str, Any]:
        """Where this worker stands: a restarted worker reports position -1 (no caches)."""
        import ray

        return {"rank": self.rank, "position": self.position, "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id()}

    def set_inputs(self, inputs: tuple[torch.Tensor, LayerInputs | dict[str, Any]], position: int = 0) -> dict[str, Any]:
        """Start both streams from block ``position``'s inputs (the embeddings' output for block 0);
        the layers' keyword arguments come per layer type (LayerInputs), or as one dict for all."""
        hidden, layer_inputs = inputs
        if not isinstance(layer_inputs, LayerInputs):
            layer_inputs = LayerInputs.uniform(layer_inputs, self.arch.num_layers)
        if len(layer_inputs) != self.arch.num_layers:
            raise ValueError(f"inputs for {len(layer_inputs)} layers, the model has {self.arch.num_layers}")
        hidden = hidden.to(torch.float32)
        self.cache.plan(hidden.numel() * hidden.element_size())
        self.q_in, self.fp_in = self.cache.copy(hidden), self.cache.copy(hidden)
        self.inputs = layer_inputs.to(self.device)
        self.position = position
        self.idle_since = time.perf_counter()
        one = hidden.numel() * hidden.element_size()
        return {"cache_bytes": one, "peak_cache_bytes": CACHES_AT_ONCE * one, "spilled": self.cache.spilled}

    def _check_position(self, index: int) -> None:
        if self.position != index:
            raise RuntimeError(f"calibrator holds the inputs of block {self.position}, was asked for block {index} "
                               "(a restarted calibrator needs set_inputs and a replay first)")

    def _layer(self, index: int, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
        """Block ``index`` from its tensors under checkpoint names (a mixture-of-experts block's
        per-expert linears fused as the module holds them), in float32 on the device."""
        tensors = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in tensors.items()}
        tensors = self.arch.for_layer(index).to_module(tensors)
        return decoder_layer(self.layer_cls, self.config, index, tensors).to(self.device)

    def calibrate(self, index: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                  next_tensors: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
        """Calibrate block ``index`` from its FP tensors; returns its stored tensors and statistics.
        ``meta`` is the reader's record of the block (passed through to the writer);
        ``next_tensors``: block index+1's FP tensors, for cross-layer learning."""
        t0 = time.perf_counter()
        io_wait = t0 - self.idle_since  # idle time before this call could start: waiting on the reader
        self._check_position(index)
        layer = self._layer(index, tensors)
        kwargs = self.inputs[index]  # this block's own mask and rotary embeddings
        bs = self.cfg.forward_batch(self.world)
        targets = forward_all(layer, self.fp_in, kwargs, bs, out=self.cache.empty_like(self.fp_in))
        next_layer = (WithInputs(self._layer(index + 1, next_tensors), self.inputs[index + 1])
                      if next_tensors is not None else None)
        self.oac_h.clear()  # the OAC pass's boundary activations are no longer needed
        grads = self.oac_g.pop(index, None)
        if methods.get(self.cfg.method).needs_output_grads and grads is None:
            raise RuntimeError(f"no OAC gradients for block {index}: the OAC pass must run first")
        shard = self._shard()
        result = calibrate_block(layer, kwargs, self.q_in, targets, self.arch.for_layer(index), self.cfg, index,
                                 fp_inputs=self.fp_in, shard=shard, next_layer=next_layer, output_grads=grads,
                                 measure_after=False)
        del next_layer, grads
        self.fp_in = None  # at most three caches at once: FP targets, quantized inputs, next inputs
        # the next block sees the weights as stored (GPTQ rounds scales to float16), the same ones a
        # resumed run's replay reads back from the files; written into the layer in place (its FP
        # weights are no longer needed): a block's weights are on the device once, not twice
        stored = formats.block_tensors(self.fmt, layer_prefix(index), result)
        self._load_stored(layer, index, stored)
        q_next = forward_all(layer, self.q_in, kwargs, bs, abits=self.cfg.abits, out=self.cache.empty_like(self.q_in))
        # the error after calibration: of the weights as stored, on the outputs just computed
        result.loss_after, result.rel_after = stream_errors(q_next, targets, bs, shard, self.device)
        self.fp_in, self.q_in = targets, q_next
        self.position = index + 1
        seconds = time.perf_counter() - t0
        self.idle_since = time.perf_counter()
        stats = {
            "index": index,
            "device": self.device.type,
            "loss_before": result.loss_before,
            "loss_after": result.loss_after,
            "rel_before": result.rel_before,
            "rel_after": result.rel_after,
            "losses": result.losses,
            "trainable_params": result.trainable_params,
            "calib_seconds": result.seconds,
            "seconds": seconds,
            "io_wait_seconds": io_wait,
            "bytes_read": meta["bytes_read"],
            "read_seconds": meta["read_seconds"],
            "peak_rss_reader": meta["peak_rss_reader"],
            "peak_rss_calibrator": peak_rss_bytes(),
            "lowrank_bytes": sum(t.numel() * t.element_size() for k, t in stored.items()
                                 if k.endswith((".lowrank_a", ".lowrank_b"))),
        }
        if result.moe is not None:  # routed tokens per expert, those rounded to nearest for lack of them
            stats["experts"] = result.moe
        # every worker ends with the same parameters; only rank 0 ships the tensors to the writer
        return {"tensors": stored if self.rank == 0 else {}, "source_fingerprint": meta["fingerprint"], "stats": stats}

    def replay(self, index: int, tensors: dict[str, torch.Tensor], stored: dict[str, torch.Tensor]) -> None:
        """Advance both streams through an already-finished block: the FP block for the FP stream,
        the stored quantized block (exactly the weights the original run used) for the other."""
        self._check_position(index)
        layer = self._layer(index, tensors)
        bs = self.cfg.forward_batch(self.world)
        self.oac_g.pop(index, None)  # a finished block needs no OAC gradients
        targets = forward_all(layer, self.fp_in, self.inputs[index], bs, out=self.cache.empty_like(self.fp_in))
        self._load_stored(layer, index, stored)
        self.q_in = forward_all(layer, self.q_in, self.inputs[index], bs, abits=self.cfg.abits,
                                out=self.cache.empty_like(self.q_in))
        self.fp_in = targets
        self.position = index + 1
        self.idle_since = time.perf_counter()

    # ------------------------------------------------------------------ OAC's gradient pass
    def oac_forward(self, index: int, tensors: dict[str, torch.Tensor], num_blocks: int) -> dict[str, Any]:
        """FP forward through block ``index``, keeping its output (block 0 starts from the FP inputs).
        Returns the caches' size and whether they spill."""
        one = self.fp_in.numel() * self.fp_in.element_size()
        if index == 0:
            self.oac_h, self.oac_g = {0: self.fp_in}, {}
            # every boundary activation (and later every block's gradient) at once: spill above the budget
            self.cache.plan(one, CACHES_AT_ONCE + num_blocks)
        layer = self._layer(index, tensors)
        with torch.no_grad():
            self.oac_h[index + 1] = forward_all(layer, self.oac_h[index], self.inputs[index], self.cfg.forward_batch(self.world),
                                                out=self.cache.empty_like(self.fp_in))
        return {"peak_cache_bytes": (CACHES_AT_ONCE + num_blocks) * one, "spilled": self.cache.spilled}

    def oac_head(self, head: dict[str, torch.Tensor], ids: torch.Tensor, predicted_total: int) -> float:
        """The loss at the model's head on the last block's output; keeps its gradient. Returns this
        worker's part of the mean next-token cross-entropy."""
        from lsiq.oac import head_gradient
        from pipeline.model_io import skeleton, with_tensors

        model = with_tensors(skeleton(self.config), head)
        if getattr(self.config, "tie_word_embeddings", False):
            model.tie_weights()
        norm, lm_head = model.model.norm.to(self.device), model.lm_head.to(self.device)
        last = max(self.oac_h)
        self.oac_g[last - 1], loss = head_gradient(norm, lm_head, self.oac_h.pop(last), ids, predicted_total,
                                                   self.cfg.forward_batch(self.world), out=self.cache.empty_like(self.fp_in),
                                                   softcap=getattr(self.config, "final_logit_softcapping", None))
        return loss

    def oac_backward(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        """From dL/d(output of block ``index``) to dL/d(output of block index - 1), recomputing the block."""
        from lsiq.oac import block_backward

        layer = self._layer(index, tensors)
        self.oac_g[index - 1] = block_backward(layer, self.oac_h.pop(index), self.oac_g[index], self.inputs[index],
                                               self.cfg.forward_batch(self.world), out=self.cache.empty_like(self.fp_in))

    @torch.no_grad()
    def _load_stored(self, layer: torch.nn.Module, index: int, stored: dict[str, torch.Tensor]) -> None:
        """Write block ``index``'s stored tensors into ``layer`` in place, each linear dequantized on
        the device as it is written (a routed expert's into its slices of the fused parameters)."""
        prefix = layer_prefix(index)
        arch = self.arch.for_layer(index)
        on_device = {k[len(prefix):]: v.to(self.device) for k, v in stored.items()}  # unpacked where the layer runs
        linears, plain = formats.read_linears(self.fmt, on_device, self.cfg.spec)
        write_linears(layer, arch, ((n, q.weight()) for n, q in linears.items()))
        own = dict(layer.named_parameters()) | dict(layer.named_buffers())
        for k, v in arch.to_module(plain).items():
            own[k].copy_(v)

    def peak_rss(self) -> int:
        return peak_rss_bytes()


def remote_calibrators(config_dict: dict[str, Any], calib_cfg: CalibConfig, device: str, num_cpus: int,
                       num_gpus: float, workers: int, nsamples: int, activation_budget: int | None = None,
                       spill_dir: str | None = None, max_restarts: int = 3, fmt: str = "native"
                       ) -> list[ray.actor.ActorHandle]:
    """Start ``workers`` calibrator actors with explicit resources, worker r owning a contiguous
    share of the samples. Ray restarts a dead worker's process (``max_restarts``); calls are not
    retried, because a restarted calibrator has lost its caches: the driver rebuilds them
    (set_inputs, then replay of the finished blocks) and redoes the block."""
    import ray

    actor_cls = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=max_restarts,
                           max_task_retries=0)(BlockCalibrator)
    return [actor_cls.remote(config_dict, calib_cfg, device, num_cpus, activation_budget, spill_dir, rank, workers,
                             shard_range(nsamples, workers, rank), nsamples, fmt)
            for rank in range(workers)]


def form_group(calibrators: list[ray.actor.ActorHandle], timeout_s: float = 120.0) -> None:
    """(Re)form the workers' process group: rank 0 picks the address, all join at once."""
    if len(calibrators) == 1:
        return
    import ray

    addr, port = ray.get(calibrators[0].rendezvous.remote())
    ray.get([c.join_group.remote(addr, port, timeout_s) for c in calibrators])
