"""Calibration of one transformers decoder block: RTN, GPTQ, LWC, LWC+LET and LSI.

Input: the model's own decoder layer (fp32 weights), the keyword arguments the model passes to its
layers (rotary position embeddings, mask), the cached inputs that the already-quantized blocks
produced and the FP block's targets. Output: integer weights, scales and zero points for every
linear, the LET-folded norms and biases, and the loss curve. Composition inside the calibrated
forward: LSI -> LET -> LWC -> fake quantizer, the weights rebuilt once per optimizer step.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn
from torch.func import functional_call

from lsiq.arch import ATTN_OUT, ATTN_QKV, LINEARS, MLP_IN, BlockArch
from lsiq.gptq import HessianAccumulator, gptq_quantize
from lsiq.let import LET, smooth_scale
from lsiq.lowrank import KINDS as LOWRANK_KINDS
from lsiq.lowrank import lowrank_correction
from lsiq.lsi import SVD_METHODS, SVDIncrement, svd_factors, svd_owners
from lsiq.lwc import LWC
from lsiq.quantizer import ActQuantizer, QuantSpec, dequantize, fake_quant, minmax_scale_zero, quantize_codes

METHODS = ("rtn", "gptq", "lwc", "lwc-let", "lsi", "sde", "oac")
PRECISIONS = ("fp32", "bf16")
SOLVE_DTYPES = ("auto", "float64", "float32")


@dataclass
class CalibConfig:
    """Settings of block calibration. Learning rates follow OmniQuant's reference code (LWC 1e-2,
    LET 5e-3); LSI's dS rate (1e-2) had the lowest calibration-set block loss among 1e-4..1e-2 on
    SmolLM2 blocks 5 and 20 (scripts/explore_lsi.py, BENCHMARKS.md); the paper's 2e-4 was for 7B+."""

    method: str = "lsi"
    wbits: int = 3
    abits: int = 16
    group_size: int = 64
    sym: bool = False
    epochs: int = 5
    batch_size: int = 1
    # Samples per micro-batch of the passes that do not train (FP targets, losses, statistics,
    # Hessians, the next block's inputs), per worker; 0: a worker's share of batch_size (what one
    # training step runs on it on average). Their peak grows with it: on a GPU, fp32 attention with GQA runs
    # PyTorch's math kernel, which holds [batch, heads, seqlen, seqlen] scores (BENCHMARKS.md).
    forward_batch_size: int = 0
    seed: int = 0
    lr_lwc: float = 1e-2
    lr_let: float = 5e-3
    lr_lsi: float = 1e-2
    lsi_block_k: int = 0
    lsi_relative: bool = False  # learn dS / S instead of dS (scale-free learning rate)
    sde_band: int = 1  # SDE: learnable diagonals on each side of the singular values' diagonal
    # SDE's off-diagonal bands: at lr_lsi (1e-2) they mix singular directions too fast on small
    # layers (block loss rose on the tiny test block); 1e-3 lowered it there. Tuned by the benchmark.
    lr_sde: float = 1e-3
    # Low-rank correction of every quantized linear (lsiq.lowrank): None, "qera", "lqer" or "svd",
    # computed in closed form from the block's inputs once its weights are quantized.
    lowrank: str | None = None
    rank: int = 16
    # Cross-layer learning (CQE+): block i's loss also compares block i+1, in full precision, fed
    # with block i's quantized output, against block i+1's FP output; weight of that term.
    cross_layer: bool = False
    cross_layer_weight: float = 1.0
    lowrank_damp: float = 1e-6
    let_init: str = "auto"  # auto: smooth for weight-activation runs, ones for weight-only
    let_alpha: float = 0.5
    gptq_damp: float = 0.01
    # Recompute each linear's calibrated weight in the backward pass instead of keeping its
    # intermediates (LSI recomposition, LET scaling, LWC fake-quant: ~5.4 block-weight sizes per
    # step with LSI) from the forward: far less memory for ~half again the weight-side compute.
    recompute_weights: bool = False
    # "bf16": the training steps' matmuls run under torch.autocast in bfloat16 (tensor cores on a
    # GPU; OmniQuant trains under fp16 autocast); statistics, targets and the propagated
    # activations stay float32. "fp32": everything in float32.
    precision: str = "fp32"
    # dtype of the second-order statistics and closed-form solves (GPTQ's and OAC's Hessians,
    # --lowrank's autocorrelations and their Cholesky/SVD solves): "auto" is float64 on a CPU and
    # float32 on a GPU, where float64 runs at 1/64-1/2 of the float32 rate and float32 halves the
    # [in, in] matrices (what lets a 70B block's solves fit 24 GB). GPTQ's reference code is float32.
    solve_dtype: str = "auto"
    # LSI's and SDE's SVD of each linear (lsiq.lsi.svd_factors): "gram" through the smaller Gram
    # matrix's eigenproblem (9 k^3 of slow factorisation work instead of the R-SVD's 6 N k^2 + 20 k^3:
    # 2.9x less on square linears, 4.5x on Llama MLPs, plus two matmuls), "full" LAPACK's/cuSOLVER's
    # SVD; svd_dtype "auto" is float64 on a CPU, float32 on a GPU.
    svd: str = "gram"
    svd_dtype: str = "auto"
    # Smallest zero point of asymmetric grids (QuantSpec.zero_min): 1 when the output format cannot
    # store a zero of 0 (GPTQ v1).
    zero_min: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.solve_dtype not in SOLVE_DTYPES:
            raise ValueError(f"solve_dtype must be one of {', '.join(SOLVE_DTYPES)}, got {self.solve_dtype!r}")
        if self.svd not in SVD_METHODS:
            raise ValueError(f"svd must be one of {', '.join(SVD_METHODS)}, got {self.svd!r}")
        if self.svd_dtype not in SOLVE_DTYPES:
            raise ValueError(f"svd_dtype must be one of {', '.join(SOLVE_DTYPES)}, got {self.svd_dtype!r}")
        if self.let_init not in ("auto", "ones", "smooth"):
            raise ValueError(f"let_init must be auto, ones or smooth, got {self.let_init!r}")
        ActQuantizer(self.abits)  # validates the activation bit width
        self.spec  # noqa: B018 - validates bits, group size and zero_min
        if self.epochs < 0 or self.batch_size < 1:
            raise ValueError("epochs must be >= 0 and batch_size >= 1")
        if self.forward_batch_size < 0:
            raise ValueError(f"forward_batch_size must be >= 0 (0: a worker's share of batch_size), "
                             f"got {self.forward_batch_size}")
        if self.sde_band < 0:
            raise ValueError(f"sde_band must be >= 0, got {self.sde_band}")
        if self.lowrank is not None and self.lowrank not in LOWRANK_KINDS:
            raise ValueError(f"unknown low-rank method {self.lowrank!r}; choose one of {', '.join(LOWRANK_KINDS)}")
        if self.cross_layer and not self.trains:
            raise ValueError(f"cross-layer learning needs a method that trains (lwc, lwc-let, lsi, sde with epochs > 0), "
                             f"not {self.method}")
        if self.lowrank is not None and self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")

    def forward_batch(self, world: int = 1) -> int:
        """Samples per micro-batch of one of ``world`` workers' passes that do not train."""
        return self.forward_batch_size or math.ceil(self.batch_size / world)

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.wbits, self.group_size, self.sym, self.zero_min)

    @property
    def uses_lwc(self) -> bool:
        return self.method in ("lwc", "lwc-let", "lsi", "sde")

    @property
    def uses_let(self) -> bool:
        return self.method in ("lwc-let", "lsi", "sde")

    @property
    def uses_lsi(self) -> bool:
        """LSI or SDE: learnable singular values (SDE adds bands beside the diagonal)."""
        return self.method in ("lsi", "sde")

    @property
    def band(self) -> int:
        return self.sde_band if self.method == "sde" else 0

    @property
    def trains(self) -> bool:
        return self.uses_lwc and self.epochs > 0


@dataclass
class QuantizedLinear:
    """Integer form of one linear: codes [out, in] (uint8), scale and zero [out, groups]; with a
    low-rank correction (lsiq.lowrank), its factors A [out, r] and B [r, in] (16-bit values)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    spec: QuantSpec
    lowrank_a: torch.Tensor | None = None
    lowrank_b: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        """The quantized weight alone: ``(code - zero) * scale``."""
        return dequantize(self.codes, self.scale, self.zero, self.spec)

    def weight(self) -> torch.Tensor:
        """The weight the linear computes with: the quantized weight plus A B when corrected."""
        w = self.dequantize()
        if self.lowrank_a is not None:
            w = w + self.lowrank_a.to(w.dtype) @ self.lowrank_b.to(w.dtype)
        return w


@dataclass
class BlockResult:
    """What calibrating one block produced."""

    linears: dict[str, QuantizedLinear]
    tensors: dict[str, torch.Tensor]  # every other block tensor (LET-folded norms, biases)
    loss_before: float  # round-to-nearest block-output MSE on the calibration samples
    loss_after: float
    losses: list[float] = field(default_factory=list)  # one per optimizer step
    trainable_params: int = 0
    seconds: float = 0.0

    def dequantized_params(self) -> dict[str, torch.Tensor]:
        params = dict(self.tensors)
        for name, q in self.linears.items():
            params[f"{name}.weight"] = q.weight()
        return params


@dataclass
class SampleShard:
    """One worker's share of the calibration samples in data-parallel calibration.

    Row j of the worker's caches is global sample ``owned[j]``; ``total`` samples exist across all
    workers; ``all_reduce(t, op)`` reduces ``t`` in place across workers (op "sum" or "max"). Every
    optimizer step draws the same global batch on every worker; each worker computes the loss of
    the samples it owns, scaled by the global batch size, and the summed gradients are exactly the
    single-worker gradient (up to float summation order). With ``broadcast``, worker ``rank`` of
    ``world`` computes only its share of the block's SVDs and receives the others'.
    """

    owned: list[int]
    total: int
    all_reduce: Callable[[torch.Tensor, str], None]
    rank: int = 0
    world: int = 1
    broadcast: Callable[[torch.Tensor, int], None] | None = None  # (t, src): t := worker src's t

    def __post_init__(self) -> None:
        self._pos = {g: j for j, g in enumerate(self.owned)}

    @staticmethod
    def whole(n: int) -> SampleShard:
        """A single worker holding every sample (no communication)."""
        return SampleShard(list(range(n)), n, _no_reduce)

    @property
    def trivial(self) -> bool:
        return self.all_reduce is _no_reduce

    def local(self, idx: torch.Tensor) -> torch.Tensor:
        """Local cache rows of the global indices in ``idx`` that this worker owns (in idx order)."""
        return torch.tensor([self._pos[g] for g in idx.tolist() if g in self._pos], dtype=torch.long)


def _no_reduce(t: torch.Tensor, op: str) -> None:
    return None


def shard_range(total: int, workers: int, rank: int) -> list[int]:
    """Contiguous, balanced split of ``total`` samples: the global indices of worker ``rank``."""
    lo, hi = rank * total // workers, (rank + 1) * total // workers
    return list(range(lo, hi))


# ----------------------------------------------------------------------------- forward helpers


def block_forward(layer: nn.Module, x: torch.Tensor, layer_kwargs: dict[str, Any],
                  params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Run the decoder layer, optionally with substituted parameters (names relative to it)."""
    if params is None:
        out = layer(x, **layer_kwargs)
    else:
        out = functional_call(layer, params, (x,), layer_kwargs, strict=False)
    return out[0] if isinstance(out, tuple) else out


@contextlib.contextmanager
def act_quant_hooks(layer: nn.Module, bits: int) -> Iterator[None]:
    """Quantize the input of every linear of the block per token while inside the context."""
    quant = ActQuantizer(bits)
    handles = []
    if quant.enabled:
        for name in LINEARS:
            handles.append(layer.get_submodule(name).register_forward_pre_hook(lambda m, a: (quant(a[0]), *a[1:])))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _batches(n: int, batch_size: int, order: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
    idx = order if order is not None else torch.arange(n)
    for i in range(0, n, batch_size):
        yield idx[i:i + batch_size]


@torch.no_grad()
def forward_all(layer: nn.Module, inputs: torch.Tensor, layer_kwargs: dict[str, Any], batch_size: int,
                params: dict[str, torch.Tensor] | None = None, abits: int = 16,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Block outputs for every cached sample, kept where the inputs live (or written into ``out``,
    e.g. a memory-mapped cache)."""
    device = next(layer.parameters()).device
    outs = torch.empty_like(inputs) if out is None else out
    with act_quant_hooks(layer, abits):
        for idx in _batches(inputs.shape[0], batch_size):
            outs[idx] = block_forward(layer, inputs[idx].to(device), layer_kwargs, params).to(outs.device)
    return outs


@torch.no_grad()
def mean_loss(layer: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, layer_kwargs: dict[str, Any],
              batch_size: int, params: dict[str, torch.Tensor] | None, abits: int,
              shard: SampleShard | None = None) -> float:
    """Block-output MSE over every cached sample (of every worker, with ``shard``)."""
    device = next(layer.parameters()).device
    total = 0.0
    with act_quant_hooks(layer, abits):
        for idx in _batches(inputs.shape[0], batch_size):
            out = block_forward(layer, inputs[idx].to(device), layer_kwargs, params)
            total += torch.nn.functional.mse_loss(out, targets[idx].to(device), reduction="sum").item()
    acc = torch.tensor([total, float(targets.numel())], dtype=torch.float64)
    if shard is not None:
        shard.all_reduce(acc, "sum")
    return (acc[0] / acc[1]).item()


# ----------------------------------------------------------------------------- the learnable block


class BlockQuantizer(nn.Module):
    """The learnable parameters of one block for LWC / LWC+LET / LSI and the weights they give."""

    def __init__(self, layer: nn.Module, arch: BlockArch, cfg: CalibConfig,
                 let_init: dict[str, torch.Tensor] | None = None, shard: SampleShard | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.spec = cfg.spec
        self.base = {k: v.detach() for k, v in layer.state_dict().items()}
        key = _key
        self.lsi = nn.ModuleDict()
        if cfg.uses_lsi:
            factors = _block_svds({n: self.base[f"{n}.weight"] for n in LINEARS}, cfg, shard)
            for name in LINEARS:
                self.lsi[key(name)] = SVDIncrement(self.base[f"{name}.weight"], cfg.lsi_block_k, cfg.lsi_relative,
                                                   factors[name], band=cfg.band)
        self.let = LET(arch, let_init).to(_device(layer)) if cfg.uses_let else None
        self.lwc = nn.ModuleDict()
        if cfg.uses_lwc:
            for name in LINEARS:
                out_f, in_f = self.base[f"{name}.weight"].shape
                self.lwc[key(name)] = LWC(out_f, in_f, self.spec).to(_device(layer))

    def param_groups(self) -> list[dict[str, Any]]:
        groups = [{"params": list(self.lwc.parameters()), "lr": self.cfg.lr_lwc}]
        if self.let is not None:
            groups.append({"params": list(self.let.parameters()), "lr": self.cfg.lr_let})
        if len(self.lsi):
            named = list(self.lsi.named_parameters())
            groups.append({"params": [p for n, p in named if not n.endswith("bands")], "lr": self.cfg.lr_lsi})
            groups.append({"params": [p for n, p in named if n.endswith("bands")], "lr": self.cfg.lr_sde})
        return [g for g in groups if g["params"]]

    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def transformed(self) -> dict[str, torch.Tensor]:
        """Block tensors after LSI and LET, before weight quantization."""
        others = self._transformed_others()
        return {k: self._transformed_weight(k[: -len(".weight")]) if _is_linear_weight(k) else others[k]
                for k in self.base}

    def _transformed_others(self) -> dict[str, torch.Tensor]:
        """The block's tensors other than the linears' weights (norms, biases) after LET."""
        t = {k: v for k, v in self.base.items() if not _is_linear_weight(k)}
        return self.let.transform(t) if self.let is not None else t

    def _transformed_weight(self, name: str) -> torch.Tensor:
        """One linear's weight after LSI and LET (LET applied to it alone: the same products)."""
        w = self.lsi[_key(name)]() if _key(name) in self.lsi else self.base[f"{name}.weight"]
        if self.let is not None:
            w = self.let.transform({f"{name}.weight": w})[f"{name}.weight"]
        return w

    @torch.no_grad()
    def fp_weights(self) -> dict[str, torch.Tensor]:
        """Each linear's full-precision weight with LET applied but not LSI: with the folded norms
        (LET keeps the FP output) it computes the FP block; what a low-rank correction aims at."""
        out = {}
        for name in LINEARS:
            w = self.base[f"{name}.weight"]
            out[name] = self.let.transform({f"{name}.weight": w})[f"{name}.weight"].detach() if self.let is not None else w
        return out

    def scale_zero(self, name: str, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if _key(name) in self.lwc:
            return self.lwc[_key(name)].scale_zero(w)
        return minmax_scale_zero(w, self.spec)

    def effective(self) -> dict[str, torch.Tensor]:
        """Parameters for the calibrated forward: transformed, weights fake-quantized."""
        t = self._transformed_others()
        for name in LINEARS:
            if self.cfg.recompute_weights and torch.is_grad_enabled():
                t[f"{name}.weight"] = torch.utils.checkpoint.checkpoint(self._effective_weight, name,
                                                                        use_reentrant=False)
            else:
                t[f"{name}.weight"] = self._effective_weight(name)
        return t

    def _effective_weight(self, name: str) -> torch.Tensor:
        """One linear's weight after LSI and LET, fake-quantized on its (learned) grid."""
        w = self._transformed_weight(name)
        scale, zero = self.scale_zero(name, w)
        w = fake_quant(w, scale, zero, self.spec)
        # bf16: the linear's autocast would cast it to bfloat16 anyway (the same rounding); cast here,
        # the float32 weight is not held beside the bfloat16 copy saved for the backward (the dict
        # of parameters keeps it through the step: a block's weights in float32 on a GPU)
        if self.cfg.precision == "bf16" and torch.is_autocast_enabled(w.device.type):
            w = w.to(torch.bfloat16)
        return w

    @torch.no_grad()
    def finalize(self) -> tuple[dict[str, QuantizedLinear], dict[str, torch.Tensor]]:
        """Fold everything into integer weights plus plain (folded) non-linear tensors."""
        t = {k: v.detach() for k, v in self.transformed().items()}
        linears = {}
        for name in LINEARS:
            w = t.pop(f"{name}.weight")
            scale, zero = self.scale_zero(name, w)
            linears[name] = QuantizedLinear(quantize_codes(w, scale, zero, self.spec), scale.detach().clone(),
                                            zero.detach().clone(), self.spec)
        return linears, {k: v.clone() for k, v in t.items()}


def _block_svds(weights: dict[str, torch.Tensor], cfg: CalibConfig, shard: SampleShard | None
                ) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The SVD of every linear: all computed here by a single worker; with data-parallel workers
    each computes its share (svd_owners), then every factor is broadcast from its owner. All
    owners compute first and broadcast after, in one fixed order, so no SVD waits on another's."""
    def factors(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # "auto": svd_factors' own default dtype for the weight's device (lsiq.lsi.svd_dtype)
        return svd_factors(w, cfg.svd, None if cfg.svd_dtype == "auto" else getattr(torch, cfg.svd_dtype))

    if shard is None or shard.world == 1 or shard.broadcast is None:
        return {n: factors(w) for n, w in weights.items()}
    owners = svd_owners({n: tuple(w.shape) for n, w in weights.items()}, shard.world, cfg.svd)
    mine = {n: factors(w) for n, w in weights.items() if owners[n] == shard.rank}

    def empty(name: str) -> tuple[torch.Tensor, ...]:
        w = weights[name]
        r = min(w.shape)
        return w.new_empty(w.shape[0], r), w.new_empty(r), w.new_empty(r, w.shape[1])

    return _broadcast_from_owners(mine, list(weights), owners, shard, empty)


def _broadcast_from_owners(mine: dict[str, tuple[torch.Tensor, ...]], names: list[str], owners: dict[str, int],
                           shard: SampleShard, empty: Callable[[str], tuple[torch.Tensor, ...]]
                           ) -> dict[str, tuple[torch.Tensor, ...]]:
    """Every name's tensors on every worker: this worker's own (``mine``, computed before the
    call), the others' received from their owners into ``empty(name)``. Every worker walks
    ``names`` in the same order, so no broadcast waits on a computation still running elsewhere."""
    out = {}
    for name in names:
        out[name] = mine[name] if name in mine else empty(name)
        for t in out[name]:
            shard.broadcast(t, owners[name])
    return out


def _is_linear_weight(key: str) -> bool:
    return key.endswith(".weight") and key[: -len(".weight")] in LINEARS


def _key(linear: str) -> str:
    return linear.replace(".", "__")


def solve_dtype(cfg: CalibConfig, device: torch.device) -> torch.dtype:
    """The dtype of Hessians, autocorrelations and their solves (CalibConfig.solve_dtype)."""
    if cfg.solve_dtype == "auto":
        return torch.float64 if device.type == "cpu" else torch.float32
    return getattr(torch, cfg.solve_dtype)


def _device(layer: nn.Module) -> torch.device:
    return next(layer.parameters()).device


# ----------------------------------------------------------------------------- statistics and inits


@torch.no_grad()
def input_absmax(layer: nn.Module, inputs: torch.Tensor, layer_kwargs: dict[str, Any],
                 batch_size: int, names: tuple[str, ...], shard: SampleShard | None = None) -> dict[str, torch.Tensor]:
    """Per-channel max |x| of the inputs of the named linears over the cached samples (of every worker)."""
    device = _device(layer)
    stats: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable[..., None]:
        def fn(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            m = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0)
            stats[name] = torch.maximum(stats[name], m) if name in stats else m
        return fn

    handles = [layer.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        for idx in _batches(inputs.shape[0], batch_size):
            block_forward(layer, inputs[idx].to(device), layer_kwargs)
    finally:
        for h in handles:
            h.remove()
    if shard is not None:
        for name in names:
            shard.all_reduce(stats[name], "max")
    return stats


def smooth_let_init(layer: nn.Module, arch: BlockArch, inputs: torch.Tensor, layer_kwargs: dict[str, Any],
                    batch_size: int, alpha: float, shard: SampleShard | None = None) -> dict[str, torch.Tensor]:
    """OmniQuant's LET initialisation from activation maxima (SmoothQuant, GQA-aware for `out`)."""
    acts = input_absmax(layer, inputs, layer_kwargs, batch_size, (ATTN_QKV[0], MLP_IN[0], ATTN_OUT), shard)
    sd = layer.state_dict()

    def wmax(names: tuple[str, ...]) -> torch.Tensor:
        return torch.stack([sd[f"{n}.weight"].abs().amax(0) for n in names]).amax(0)

    # o_proj reads n_heads * head_dim channels; the scale lives on the KV heads' channels, so take
    # the max over the query heads that share a KV head.
    kv, g, hd = arch.n_kv_heads, arch.kv_groups, arch.head_dim
    o_act = acts[ATTN_OUT].view(kv, g, hd).amax(1).reshape(-1)
    o_w = sd[f"{ATTN_OUT}.weight"].abs().amax(0).view(kv, g, hd).amax(1).reshape(-1)
    return {
        "qkv": smooth_scale(acts[ATTN_QKV[0]], wmax(ATTN_QKV), alpha),
        "fc1": smooth_scale(acts[MLP_IN[0]], wmax(MLP_IN), alpha),
        "out": smooth_scale(o_act, o_w, alpha),
    }


# ----------------------------------------------------------------------------- calibration


def _rtn_params(layer: nn.Module, spec: QuantSpec) -> dict[str, torch.Tensor]:
    params = {}
    for name in LINEARS:
        w = layer.get_submodule(name).weight.detach()
        params[f"{name}.weight"] = fake_quant(w, *minmax_scale_zero(w, spec), spec)
    return params


@torch.no_grad()
def input_autocorrelations(layer: nn.Module, inputs: torch.Tensor, layer_kwargs: dict[str, Any], cfg: CalibConfig,
                           shard: SampleShard | None = None, params: dict[str, torch.Tensor] | None = None
                           ) -> dict[str, torch.Tensor]:
    """2/n sum x x^T [in, in] (in :func:`solve_dtype`) of every linear's inputs over the calibration samples (all
    workers' samples when data-parallel), with the block run on ``params`` (default: its weights)
    and activation quantization on, so each linear sees what it will see at inference."""
    device = _device(layer)
    dtype = solve_dtype(cfg, device)
    hess = {n: HessianAccumulator(layer.get_submodule(n).in_features, device, dtype) for n in LINEARS}
    # The activation quantizers' hooks go first so that H is built from the inputs the layer sees.
    with act_quant_hooks(layer, cfg.abits):
        handles = [layer.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: hess[n].add(a[0]))
                   for n in LINEARS]
        try:
            for idx in _batches(inputs.shape[0], cfg.forward_batch(shard.world if shard is not None else 1)):
                block_forward(layer, inputs[idx].to(device), layer_kwargs, params)
        finally:
            for h in handles:
                h.remove()
    if shard is not None and not shard.trivial:
        for acc in hess.values():  # H of all samples = count-weighted mean of the workers' H
            n = torch.tensor([float(acc.n)], dtype=acc.h.dtype)
            acc.h *= acc.n
            shard.all_reduce(acc.h, "sum")
            shard.all_reduce(n, "sum")
            acc.h /= n.item()
    return {n: acc.h for n, acc in hess.items()}


def _oac_hessians(layer: nn.Module, fp_inputs: torch.Tensor, output_grads: torch.Tensor,
                  layer_kwargs: dict[str, Any], cfg: CalibConfig, shard: SampleShard | None) -> dict[str, torch.Tensor]:
    """OAC's output-adaptive Hessians, summed over every worker's tokens."""
    from lsiq.oac import oac_hessians

    world = shard.world if shard is not None else 1
    hess = oac_hessians(layer, fp_inputs, output_grads, layer_kwargs, cfg.forward_batch(world),
                        solve_dtype(cfg, _device(layer)))
    if shard is not None and not shard.trivial:
        for h in hess.values():
            shard.all_reduce(h, "sum")
    return hess


@torch.no_grad()
def _gptq(layer: nn.Module, inputs: torch.Tensor, layer_kwargs: dict[str, Any], cfg: CalibConfig,
          shard: SampleShard | None = None, hess: dict[str, torch.Tensor] | None = None
          ) -> tuple[dict[str, QuantizedLinear], dict[str, torch.Tensor]]:
    """GPTQ of every linear with ``hess`` (default: 2 X^T X of the inputs, input_autocorrelations);
    each Hessian is dropped from ``hess`` once its linear is quantized."""
    if hess is None:
        hess = input_autocorrelations(layer, inputs, layer_kwargs, cfg, shard)
    linears = {}
    for name in LINEARS:
        w = layer.get_submodule(name).weight.detach()
        q, scale, zero = gptq_quantize(w, hess.pop(name), cfg.spec, damp=cfg.gptq_damp)
        linears[name] = QuantizedLinear(quantize_codes(q, scale, zero, cfg.spec), scale, zero, cfg.spec)
    tensors = {k: v.detach().clone() for k, v in layer.state_dict().items()
               if k.rsplit(".", 1)[0] not in LINEARS or not k.endswith(".weight")}
    return linears, tensors


@torch.no_grad()
def add_lowrank(layer: nn.Module, inputs: torch.Tensor, layer_kwargs: dict[str, Any], cfg: CalibConfig,
                result: BlockResult, targets: dict[str, torch.Tensor], shard: SampleShard | None = None) -> None:
    """Give every linear of ``result`` its rank-``cfg.rank`` correction of (target - quantized weight).

    ``targets``: each linear's full-precision weight in the calibrated block's coordinates (LET
    applied, so with the block's folded norms it computes the FP block); each is dropped from the
    dict once used. The inputs' autocorrelation comes from the quantized block (uncorrected) on the
    quantized stream. A and B are rounded to float16, the precision they are stored in, before
    anything uses them. With data-parallel workers each solves its share of the linears (as the
    SVDs are shared out: svd_owners) and the factors are broadcast from their owners."""
    autocorr = (input_autocorrelations(layer, inputs, layer_kwargs, cfg, shard, params=result.dequantized_params())
                if cfg.lowrank != "svd" else {})  # svd ignores the inputs
    dtype = solve_dtype(cfg, _device(layer))
    shared = shard is not None and shard.world > 1 and shard.broadcast is not None
    shapes = {name: tuple(q.codes.shape) for name, q in result.linears.items()}
    owners = svd_owners(shapes, shard.world) if shared else dict.fromkeys(shapes, 0)  # cost ~ an SVD each
    me = shard.rank if shared else 0
    failed: Exception | None = None
    try:
        for name, q in result.linears.items():
            if owners[name] != me:  # another worker's: dropped here
                del targets[name]
                autocorr.pop(name, None)
                continue
            # E and R passed on without a reference kept here, so the solve frees them as it goes
            a, b = lowrank_correction(targets.pop(name).to(dtype) - q.dequantize().to(dtype), cfg.rank, cfg.lowrank,
                                      autocorr.pop(name, None), cfg.lowrank_damp, dtype)
            a16, b16 = a.to(torch.float16), b.to(torch.float16)
            if not (torch.isfinite(a16).all() and torch.isfinite(b16).all()):
                raise FloatingPointError(f"{name}: the low-rank correction overflows float16")
            # row-major: LAPACK's factors come column-major, and a broadcast sends raw memory
            q.lowrank_a, q.lowrank_b = a16.to(q.scale.dtype).contiguous(), b16.to(q.scale.dtype).contiguous()
    except Exception as e:  # noqa: BLE001 - re-raised below, on every worker, not only this one
        failed = e
    if shared:  # a failed solve stops every worker before the broadcasts, none waits on it
        flag = torch.tensor([float(failed is not None)], dtype=torch.float64)
        shard.all_reduce(flag, "sum")
        if flag.item() and failed is None:
            raise FloatingPointError("another data-parallel worker's low-rank correction failed")
    if failed is not None:
        raise failed
    if shared:
        def empty(name: str) -> tuple[torch.Tensor, ...]:
            (m, n), scale = shapes[name], result.linears[name].scale
            k = min(cfg.rank, m, n)
            return scale.new_empty(m, k), scale.new_empty(k, n)

        mine = {n: (q.lowrank_a, q.lowrank_b) for n, q in result.linears.items() if owners[n] == me}
        for name, (a, b) in _broadcast_from_owners(mine, list(shapes), owners, shard, empty).items():
            result.linears[name].lowrank_a, result.linears[name].lowrank_b = a, b


def calibrate_block(layer: nn.Module, layer_kwargs: dict[str, Any], inputs: torch.Tensor, targets: torch.Tensor,
                    arch: BlockArch, cfg: CalibConfig, block_index: int = 0,
                    fp_inputs: torch.Tensor | None = None,
                    on_step: Callable[[int, int, float], None] | None = None,
                    shard: SampleShard | None = None, next_layer: nn.Module | None = None,
                    output_grads: torch.Tensor | None = None) -> BlockResult:
    """Quantize one block.

    ``inputs``: [N, L, hidden], the previous quantized blocks' outputs; ``targets``: the FP block's
    output on the FP inputs; ``fp_inputs`` (optional) feed the LET activation statistics.
    ``next_layer`` (with ``cfg.cross_layer``): block i+1 in full precision; each step's loss adds
    ``cfg.cross_layer_weight`` x the MSE between it fed with this block's quantized output and it fed
    with the FP targets (computed per batch: no extra cache). The reported losses before and after
    stay this block's own output MSE. ``output_grads`` (method ``oac``): dL/d(block output) of the
    model's loss for the FP stream's samples, [N, L, hidden] like ``fp_inputs`` (lsiq.oac).
    ``layer`` is left unchanged. Deterministic for a given ``cfg.seed`` and ``block_index``.
    With ``shard``, this is one of several data-parallel workers holding some of the samples.
    """
    shard = shard or SampleShard.whole(inputs.shape[0])
    t0 = time.perf_counter()
    device = _device(layer)
    for p in layer.parameters():
        p.requires_grad_(False)
    if next_layer is not None:
        for p in next_layer.parameters():
            p.requires_grad_(False)
    fb = cfg.forward_batch(shard.world)
    loss_rtn = mean_loss(layer, inputs, targets, layer_kwargs, fb, _rtn_params(layer, cfg.spec), cfg.abits, shard)
    losses: list[float] = []
    trainable = 0
    bq: BlockQuantizer | None = None
    if cfg.method == "rtn":
        linears, tensors = BlockQuantizer(layer, arch, cfg).finalize()
    elif cfg.method == "gptq":
        linears, tensors = _gptq(layer, inputs, layer_kwargs, cfg, shard)
    elif cfg.method == "oac":
        if output_grads is None or fp_inputs is None:
            raise ValueError("method oac needs the FP inputs and the loss gradients at the block's output "
                             "(the pipeline's OAC pass computes them; see lsiq.oac)")
        linears, tensors = _gptq(layer, inputs, layer_kwargs, cfg, shard,
                                 hess=_oac_hessians(layer, fp_inputs, output_grads, layer_kwargs, cfg, shard))
    else:
        let_init = None
        if cfg.uses_let and (cfg.let_init == "smooth" or (cfg.let_init == "auto" and cfg.abits < 16)):
            let_init = smooth_let_init(layer, arch, fp_inputs if fp_inputs is not None else inputs,
                                       layer_kwargs, fb, cfg.let_alpha, shard)
        bq = BlockQuantizer(layer, arch, cfg, let_init, shard)
        trainable = bq.trainable_params()
        opt = torch.optim.AdamW(bq.param_groups(), weight_decay=0.0)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + block_index)
        n = shard.total
        steps = cfg.epochs * math.ceil(n / cfg.batch_size)
        per_sample = targets[0].numel()
        learnable = [p for g in bq.param_groups() for p in g["params"]]
        step = 0
        with act_quant_hooks(layer, cfg.abits):
            for _epoch in range(cfg.epochs):
                for idx in _batches(n, cfg.batch_size, torch.randperm(n, generator=gen)):
                    # mean over the global batch = (sum over the samples each worker owns) / batch elements
                    loc = shard.local(idx)
                    opt.zero_grad(set_to_none=True)
                    loss_sum = torch.zeros((), dtype=torch.float64)
                    if len(loc):
                        with _autocast(device, cfg.precision):
                            params = bq.effective()  # LSI recomposition + LET + LWC, once per step
                            out = block_forward(layer, inputs[loc].to(device), layer_kwargs, params)
                        target = targets[loc].to(device)
                        loss = torch.nn.functional.mse_loss(out.float(), target, reduction="sum") / (len(idx) * per_sample)
                        if next_layer is not None and cfg.cross_layer:
                            with torch.no_grad(), _autocast(device, cfg.precision):  # both at one precision
                                next_target = block_forward(next_layer, target, layer_kwargs).float()
                            with _autocast(device, cfg.precision):
                                next_out = block_forward(next_layer, out, layer_kwargs)
                            loss = loss + cfg.cross_layer_weight * torch.nn.functional.mse_loss(
                                next_out.float(), next_target, reduction="sum") / (len(idx) * per_sample)
                        loss.backward()
                        loss_sum = loss.detach().to(torch.float64).cpu()
                    if not shard.trivial:
                        _all_reduce_grads(learnable, shard)
                        shard.all_reduce(loss_sum, "sum")
                    if not torch.isfinite(loss_sum):
                        raise FloatingPointError(f"block {block_index}: loss became {loss_sum.item()} at step {step}")
                    opt.step()
                    losses.append(loss_sum.item())
                    step += 1
                    if on_step is not None:
                        on_step(step, steps, losses[-1])
        # the last step's weights and graph (cross-layer: block i+1's too): not kept through the solves below
        params = out = loss = target = next_out = next_target = None
        linears, tensors = bq.finalize()
        del opt, learnable  # Adam's state: not kept through the solves either
    result = BlockResult(linears, tensors, loss_before=loss_rtn, loss_after=float("nan"), losses=losses,
                         trainable_params=trainable)
    if cfg.lowrank is not None:
        targets_fp = bq.fp_weights() if bq is not None else {n: layer.get_submodule(n).weight.detach() for n in LINEARS}
        bq = None  # its SVD factors and learned parameters: the solves need only the FP targets and the codes
        add_lowrank(layer, inputs, layer_kwargs, cfg, result, targets_fp, shard)
    bq = None  # nor through the last loss pass (a block's SVD factors: 4.5 GiB for Llama-2-70B)
    result.loss_after = mean_loss(layer, inputs, targets, layer_kwargs, fb,
                                  result.dequantized_params(), cfg.abits, shard)
    result.seconds = time.perf_counter() - t0
    return result


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _all_reduce_grads(params: list[torch.Tensor], shard: SampleShard) -> None:
    """Sum the gradients of the learnable parameters across workers, in one flat buffer."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    shard.all_reduce(flat, "sum")
    offset = 0
    for p, g in zip(params, grads, strict=True):
        p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
        offset += g.numel()
