"""Plan a run before paying for it: per-worker memory and a time estimate from a model's config.json.

    python -m pipeline.plan --model-config clusters/models/llama-2-70b/config.json --gpus 8 --gpu-mem 24GB \
        --wbits 4 --group-size 128 --nsamples 128 --seqlen 2048

The memory model counts what the calibrator actually allocates on its device for one block (the
coefficients are measured from the code with autograd's saved-tensor hooks; tests/test_plan.py
checks them against it); the time model counts FLOPs and bytes moved per block and divides by
throughputs that are parameters (defaults: an A10G-class 24 GB GPU, fp32 matmuls; measured
values for this CPU are in BENCHMARKS.md). The formulas are in docs/planning.md.
Mixture-of-experts models (Mixtral, Qwen3-MoE, DeepSeek-V3, gpt-oss) are planned by stage, as
lsiq.moe calibrates them: the layer's own weights on the device, the attention shared out over the
workers' samples, then the shared experts and the routed experts in groups, each unit on one worker;
the plan picks the largest --expert-group that fits, and plans leading dense layers as dense blocks.
The last line on stdout is one JSON object: ``fits``, ``hours``, ``per_worker_bytes`` and the
breakdowns. Exit status 1 when the plan does not fit.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import itertools
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from lsiq import methods
from lsiq.archs import BlockArch, UnsupportedArchitecture, family_for
from lsiq.config import CalibConfig
from lsiq.lsi import svd_flops, svd_matmul_flops, svd_owners
from lsiq.moe import UnitArch, attention_unit, expert_groups, group_unit, moe_unsupported, shared_unit, unit_owners
from lsiq.trainable import state_floats, trainable_count
from pipeline.cli import BadInput, add_budget_args, add_config_args, config_from_args, per_worker_batch
from pipeline.config import QuantizeConfig, parse_bytes

DEFAULT_COLLECTIVE_TIMEOUT = QuantizeConfig.collective_timeout
F32 = 4  # the calibrator works in float32 whatever the checkpoint's dtype
F64 = 8  # CalibConfig.solve_dtype float64 (auto on a CPU); auto on a GPU is float32, F32

# What one optimizer step keeps for the backward pass (saved_weights) and the memory traffic of
# its weight side (weight_traffic), in float32 weights of the block's linears, by precision, are
# each trained method's own figures (lsiq.methods: measured from the code with autograd's
# saved-tensor hooks and a dispatch mode on random Llama blocks; tests/test_plan.py checks them).
# The linears' own saved weights count as 1.0 in fp32 and 0.5 in bf16 (autocast keeps the bfloat16
# copy). The traffic is every op that is not a view or a matmul (eager PyTorch runs each as its own
# kernel; on a GPU they are bound by memory bandwidth), without AdamW's step (under 1 %) and bf16
# --cross-layer's casts of block i+1's weights (about 3 %); at group size 128 and 8:1 grouped-query
# attention (Llama-2-70B) the same measurement gives 1-2 % less.
SAVED_WEIGHTS_RECOMPUTE = {"fp32": 1.0, "bf16": 0.5}  # --recompute-weights: only the fake-quantized weights stay
# Memory traffic of one optimizer step's weight side (LSI's recomposition, LET, LWC, the fake
# quantizer, their backward, bf16's casts), in float32 weights of the block's linears: the bytes
# read and written by every op that is not a view or a matmul, summed over the step (eager
# PyTorch runs each as its own kernel; on a GPU they are bound by memory bandwidth). Measured with
# a dispatch mode on random Llama blocks of two shapes (within 2 %); checked by tests/test_plan.py.
# By precision, method and --recompute-weights (which runs the weight side's forward twice); SDE
# at its default band of 1, LSI without --lsi-block-k. Not in it: AdamW's step (under 1 %), bf16
# --cross-layer's casts of block i+1's weights (about 3 %). At group size 128 and 8:1 grouped-query
# attention (Llama-2-70B) the same measurement gives 1-2 % less.
# ... and per token of the micro-batch, in float32 values: a x hidden + b x intermediate (norms,
# attention projections and SDPA outputs, the gated MLP's intermediate tensors; bf16 halves some).
SAVED_PER_TOKEN = {"fp32": (7.5, 4.0), "bf16": (7.0, 2.0)}
# A full-precision block with frozen weights run for its input gradient (block i+1 under
# --cross-layer; OAC's recomputed backward, always fp32): per token a x hidden + b x intermediate
# floats; its weights are saved as themselves, except under bf16 autocast, which keeps a bfloat16
# copy (0.5 x their fp32 bytes). Measured the same way; checked by tests/test_plan.py.
FP_BLOCK_PER_TOKEN = {"fp32": (5.0, 3.0), "bf16": (3.5, 1.5)}
FP_BLOCK_SAVED_WEIGHTS = {"fp32": 0.0, "bf16": 0.5}
# The passes that do not train (FP targets, losses, statistics, the next block's inputs) run a
# micro-batch of CalibConfig.forward_batch samples in float32: per token a x hidden + b x
# intermediate floats (measured like the above on this CPU, whose SDPA kernel holds no scores).
FORWARD_PER_TOKEN = (2.0, 3.0)
# ... plus, on a GPU, for a model with grouped-query attention: transformers' SDPA passes
# enable_gqa, which in float32 only PyTorch's math kernel takes (flash needs 16-bit, memory-
# efficient has no GQA), and it holds the scores and their softmax, [batch, heads, seqlen, seqlen]:
# this many x heads x seqlen floats per token. Measured on an H100 (torch 2.11, transformers 5.17:
# scripts/bench_gpu.py --phases, a Llama-2-70B block at 4 x 2048 tokens; BENCHMARKS.md).
GPU_GQA_SCORES = 2.0
# OAC's loss gradient at the head (lsiq.oac.head_gradient) runs a forward micro-batch through the
# final norm and lm_head: per token this many x vocab floats (the logits, their shifted copy for
# the loss, its log-softmax kept for the backward, and the logits' gradient), counted from the
# code, not measured; plus lm_head's weights.
OAC_HEAD_LOGITS = 4.0
# OAC's Hessian pass keeps more per token than a plain FP block: its hooks hold every linear's input
# until that linear's backward (measured with the hooks, as above).
OAC_PER_TOKEN = (7.0, 4.0)
# Transient bytes of the closed-form linear algebra on one linear [m, n] (k = min(m, n)) above its
# held Hessian, by solve dtype (bytes per value), as (n^2, m n, k^2) coefficients: least-squares
# fits of peak RSS on this CPU for m, n in 1024..4096 (scripts/fit_solve_memory.py; negative
# coefficients clamped to 0), within 10 % of the measurements at the 4096-wide shapes (up to 26 %
# over for lqer and svd in float32 at [1024, 4096]). The solves free what they are handed (H,
# E, R) as they go. GPTQ's solve: H's copy, its Cholesky factors, W, Q and the codes. lqer: the
# scaled error E and its SVD; svd: E's SVD. qera is not fitted but built: R's Cholesky factor L
# (one [n, n], kept for B L^{-1}) plus what svd takes for E L's SVD; 0.96-1.58 x its measurements
# (a linear form fitted to them is 0.77 x at n = 4 m, down_proj's shape class).
# scripts/bench_plan.py checks them inside whole block calibrations.
SOLVE_TRANSIENT = {F64: (9.4, 32.9, 0.0), F32: (4.1, 22.3, 0.0)}
_SVD_TRANSIENT = {F64: (0.0, 32.3, 27.3), F32: (0.0, 19.5, 10.9)}
_LQER_TRANSIENT = {F64: (0.0, 31.6, 27.1), F32: (0.0, 19.9, 10.3)}
LOWRANK_TRANSIENT = {b: {"qera": (float(b), *_SVD_TRANSIENT[b][1:]), "lqer": _LQER_TRANSIENT[b], "svd": _SVD_TRANSIENT[b]}
                     for b in (F64, F32)}


@dataclass
class Hardware:
    """Per-worker throughputs: what one GPU (or CPU share) sustains. Defaults: an A10G-class 24 GB GPU."""

    tflops: float = 20.0  # sustained fp32 matmul TFLOP/s (A10G peak 31.2)
    bf16_tflops: float = 70.0  # sustained bf16 tensor-core TFLOP/s, for --precision bf16 (A10G peak 125)
    mem_gbs: float = 450.0  # sustained memory bandwidth, GB/s (A10G peak 600), for elementwise weight work
    svd_tflops: float = 0.5  # sustained TFLOP/s of a float32 SVD (LAPACK/cuSOLVER are far from matmul speed)
    fp64_tflops: float = 0.5  # sustained float64 TFLOP/s (A10G: 1/32 of its fp32 rate), for Hessians and solves
    link_gbps: float = 10.0  # all-reduce bandwidth between workers, Gbit/s (g5.xlarge: up to 10)
    svd_bytes: int = 4  # bytes per value of the SVD by default: float32 on a GPU, float64 on a CPU (lsiq/lsi.py)
    # GPTQ's column loop (lsiq.gptq) launches a dozen small kernels per input column: seconds per
    # column beyond its FLOPs, 165-276 us on an H100 (scripts/bench_gpu.py), about launch latency
    gptq_column_us: float = 250.0
    # a float32 forward with grouped-query attention holds its scores (GPU_GQA_SCORES): true of
    # PyTorch's CUDA kernels, not of its CPU flash kernel (scripts/bench_plan.py on this CPU)
    gqa_scores: bool = True
    # sustained TFLOP/s of the symmetric eigensolver of --svd gram (9 n^3 per n x n), an assumption
    # on a GPU as svd_tflops is; on this CPU, in float64, about 1.1x LAPACK's SVD rate (BENCHMARKS.md)
    eigh_tflops: float = 0.5


@dataclass
class PlanConfig:
    """One planned run: the model's shapes, the cluster, the calibration settings."""

    arch: BlockArch
    gpus: int
    gpu_mem: int
    calib: CalibConfig = field(default_factory=lambda: CalibConfig(wbits=4, group_size=128))
    nsamples: int = 128
    seqlen: int = 2048
    hw: Hardware = field(default_factory=Hardware)
    recompute: str = "auto"  # auto | on | off
    target_hours: float | None = None

    def __post_init__(self) -> None:
        if self.gpus < 1 or self.gpu_mem <= 0:
            raise ValueError("--gpus must be >= 1 and --gpu-mem > 0")
        if not 1 <= self.gpus <= self.nsamples:
            raise ValueError(f"--gpus must be at most --nsamples ({self.nsamples}): every worker needs a sample")


def factor_bytes(out_features: int, in_features: int) -> int:
    """Bytes of one linear's SVD factors U, S and V^T in float32 (r = min(out, in))."""
    r = min(out_features, in_features)
    return F32 * (out_features * r + r + r * in_features)


def trainable_params(arch: BlockArch, cfg: CalibConfig) -> int:
    """Learnable parameters per block, as lsiq builds them (lsiq.trainable.trainable_count); a
    mixture-of-experts block's are its units' (lsiq.moe: the attention, the shared experts, every
    routed expert), none rounded to nearest for lack of tokens."""
    if getattr(arch, "moe", False):
        return sum(trainable_count(u, cfg) for u in moe_units(arch, cfg, arch.experts).values())
    return trainable_count(arch, cfg)


def hessian_rounds(cfg: CalibConfig) -> int:
    """How many times a block builds its [in, in] matrices: once for GPTQ's or OAC's Hessians, once
    for --lowrank qera/lqer's input autocorrelations."""
    return int(_method(cfg).needs_hessians(cfg)) + int(cfg.lowrank in ("qera", "lqer"))


def _method(cfg: CalibConfig) -> methods.Method:
    return methods.get(cfg.method)


def solve_bytes(cfg: CalibConfig) -> int:
    """Bytes per value of the Hessians and solves: CalibConfig.solve_dtype, "auto" being float32
    on the GPUs a plan is for."""
    return F64 if cfg.solve_dtype == "float64" else F32


def hessian_groups(arch: BlockArch, cfg: CalibConfig | None = None) -> tuple[tuple[str, ...], ...]:
    """The linears that share one [in, in] matrix: those that read one input (the descriptor's
    input groups: GPTQ's Hessians, the low-rank autocorrelations); one per linear for OAC, whose
    Hessians weigh the tokens by each linear's own output gradient."""
    if cfg is not None and _method(cfg).needs_output_grads:
        return tuple((n,) for n in arch.linears)
    return arch.input_groups


def hessian_bytes(arch: BlockArch, nbytes: int = F32, groups: tuple[tuple[str, ...], ...] | None = None) -> int:
    """Bytes of one [in, in] matrix per group of linears of a block (``groups``, default the
    descriptor's input groups), ``nbytes`` per value."""
    shapes = arch.linear_shapes()
    return nbytes * sum(shapes[g[0]][1] ** 2 for g in (groups if groups is not None else arch.input_groups))


def _solve_peak(coef: tuple[float, float, float], shapes: dict[str, tuple[int, int]], nbytes: int,
                target_bytes: int = 0, groups: tuple[tuple[str, ...], ...] | None = None) -> tuple[int, int]:
    """(Hessian bytes held, the rest) at the worst of the solves run linear by linear in the
    block's order, each Hessian (``nbytes`` per value, one per group of ``groups``, default one per
    linear) freed once the last linear of its group is solved, each FP target (``target_bytes`` per
    weight: the LET coordinates' weights of --lowrank) once its linear is (lsiq.methods.gptq, add_lowrank)."""
    order = list(shapes)
    groups = groups if groups is not None else tuple((k,) for k in order)
    worst = (0, 0)
    for i, name in enumerate(order):
        m, n = shapes[name]
        left = set(order[i:])
        held = nbytes * sum(shapes[g[0]][1] ** 2 for g in groups if left.intersection(g))
        targets = target_bytes * sum(shapes[k][0] * shapes[k][1] for k in order[i:])
        transient = int(coef[0] * n * n + coef[1] * m * n + coef[2] * min(m, n) ** 2) + targets
        worst = max(worst, (held, transient), key=sum)
    return worst


def peak_phase(mem: dict[str, int]) -> str:
    """Which phase of :func:`memory_plan` sets the peak: setup, steady, forward or solve."""
    return max(("setup", "steady", "forward", "solve"), key=lambda k: mem[f"phase_{k}"])


def forward_floats_per_token(arch: BlockArch, seqlen: int, gqa_scores: bool = True) -> float:
    """Floats one token of a float32 forward pass (no autograd) holds at its peak (``gqa_scores``:
    with the attention scores of GQA, as on a GPU)."""
    scores = GPU_GQA_SCORES * arch.n_heads * seqlen if gqa_scores and arch.n_kv_heads < arch.n_heads else 0.0
    return FORWARD_PER_TOKEN[0] * arch.hidden + FORWARD_PER_TOKEN[1] * arch.intermediate + scores


def memory_plan(p: PlanConfig, recompute: bool) -> dict[str, int]:
    """Peak bytes on one worker's device while it calibrates a block, by part (``phase_*``: the
    totals of the setup, of the steady passes over the tokens, and of the closed-form solves)."""
    a, cfg = p.arch, p.calib
    sb = solve_bytes(cfg)
    shapes = a.linear_shapes()
    lin = sum(m * n for m, n in shapes.values())
    largest = max(m * n for m, n in shapes.values())
    cross = cfg.cross_layer  # CalibConfig allows it only with a method that trains
    block = F32 * (lin + 2 * a.hidden)
    mem = {"block_weights": block, "next_block_weights": block if cross else 0}
    mem["svd_factors"] = sum(factor_bytes(m, n) for m, n in shapes.values()) if cfg.uses_lsi else 0
    # parameters, gradients, AdamW's moments and keep-best's copy (lsiq.trainable.state_floats)
    mem["optimizer_state"] = F32 * state_floats(a, cfg) if cfg.trains else 0
    b_local = math.ceil(cfg.batch_size / p.gpus)  # samples of the global batch one worker computes per step
    tokens = b_local * p.seqlen
    # the passes that do not train: a micro-batch of forward_batch samples of the worker's share
    tokens_fwd = min(cfg.forward_batch(p.gpus), math.ceil(p.nsamples / p.gpus)) * p.seqlen
    fwd_act = int(F32 * tokens_fwd * forward_floats_per_token(a, p.seqlen, p.hw.gqa_scores))
    prec = cfg.precision
    m_ = _method(cfg)
    hess = m_.needs_hessians(cfg)  # GPTQ's (or OAC's) Hessians and solves
    oac = m_.needs_output_grads
    if cfg.trains:
        coef = SAVED_WEIGHTS_RECOMPUTE[prec] if recompute else m_.saved_weights[prec]
        mem["saved_weights"] = int(F32 * coef * lin)
        per_h, per_i = SAVED_PER_TOKEN[prec]
        mem["saved_activations"] = int(F32 * tokens * (per_h * a.hidden + per_i * a.intermediate))
        if cross:  # block i+1 in full precision on block i's output, backpropagated through
            fp_h, fp_i = FP_BLOCK_PER_TOKEN[prec]
            mem["saved_weights"] += int(F32 * FP_BLOCK_SAVED_WEIGHTS[prec] * lin)
            mem["saved_activations"] += int(F32 * tokens * (fp_h * a.hidden + fp_i * a.intermediate))
        # the largest linear's weight gradient, plus (recomputing) its rebuilt intermediates
        extra = (m_.saved_weights[prec] - SAVED_WEIGHTS_RECOMPUTE[prec]) if recompute else 0.0
        mem["backward_transient"] = int(F32 * largest * (1.0 + extra))
    elif oac:  # the Hessian pass: the FP block's forward recomputed and backpropagated
        oac_h, oac_i = OAC_PER_TOKEN
        mem["saved_weights"] = 0
        scores = fwd_act - int(F32 * tokens_fwd * (FORWARD_PER_TOKEN[0] * a.hidden + FORWARD_PER_TOKEN[1] * a.intermediate))
        mem["saved_activations"] = int(F32 * tokens_fwd * (oac_h * a.hidden + oac_i * a.intermediate)) + scores
        # one linear's update in the solve dtype: its inputs, their weighted copy, its output gradient and its square
        mem["backward_transient"] = 2 * sb * tokens_fwd * max(m + n for m, n in shapes.values())
    else:  # forward passes only: a micro-batch's activations at a time
        mem["saved_weights"] = 0
        mem["saved_activations"] = fwd_act
        # GPTQ's Hessian update: the inputs in the solve dtype, scaled, and the product x^T x before it is added
        mem["backward_transient"] = (2 * sb * tokens_fwd * max(n for _, n in shapes.values())
                                     + sb * max(n * n for _, n in shapes.values())) if hess else 0
    # inputs and targets of the micro-batch (cross-layer: and block i+1's target; OAC: the gradients)
    mem["batch_io"] = (2 + int(cross) + 2 * int(oac)) * F32 * (tokens if cfg.trains else tokens_fwd) * a.hidden
    # all of one round's matrices, once built: GPTQ's / OAC's Hessians, or --lowrank's autocorrelations
    method_groups = hessian_groups(a, cfg)
    method_hess = hessian_bytes(a, sb, method_groups) if hess else 0
    lowrank_hess = hessian_bytes(a, sb) if cfg.lowrank in ("qera", "lqer") else 0
    mem["hessians"] = max(method_hess, lowrank_hess)
    # The solves, linear by linear, each Hessian freed once used: the worst moment's Hessians
    # (``solve_hessians``) and the rest (``solve_transient``: its linear algebra, the block's uint8
    # codes, and with --lowrank and LET the FP targets in LET's coordinates not yet used).
    solve = []  # (Hessians held, the rest)
    if hess:
        solve.append(_solve_peak(SOLVE_TRANSIENT[sb], shapes, sb, groups=method_groups))
        if cfg.trains:  # a trained method's GPTQ start: its Hessians' pass comes before training
            widest = max(n for _, n in shapes.values())
            solve.append((method_hess, fwd_act + 2 * sb * tokens_fwd * widest + sb * widest * widest))
    if cfg.lowrank is not None:
        # (svd builds no autocorrelation: nothing held)
        target = F32 if cfg.uses_let else 0
        solve.append(_solve_peak(LOWRANK_TRANSIENT[sb][cfg.lowrank], shapes, sb if cfg.lowrank != "svd" else 0, target,
                                 groups=a.input_groups))
        if cfg.lowrank != "svd":  # the autocorrelation pass, forward only, on the dequantized weights
            # (F32 lin): all the matrices, a micro-batch's activations, and the widest input in the
            # solve dtype, scaled, and its x^T x before it is added
            widest = max(n for _, n in shapes.values())
            solve.append((lowrank_hess, (target + F32) * lin + sb * widest * (widest + 2 * tokens_fwd) + fwd_act))
    worst = max(solve, key=sum) if solve else (0, 0)
    mem["solve_hessians"] = worst[0]
    mem["solve_transient"] = worst[1] + lin if solve else 0
    # setup: the SVD of the largest linear, before training: "full" holds its copy, U, V^T and a
    # workspace of its size; "gram" its copy, P = U^T A, the Gram matrix and the eigensolver's
    # vectors and workspace (~3 k^2): 0.6-0.8x of this measured on this CPU (float64, 2048 x 5632)
    m, n = max(shapes.values(), key=lambda s: s[0] * s[1])
    k = min(m, n)
    if not cfg.uses_lsi:
        svd = 0
    elif cfg.svd == "gram":
        svd = svd_value_bytes(p) * (2 * m * n + 4 * k * k)
    else:
        svd = svd_value_bytes(p) * (2 * m * n + m * k + k * n)
    held = block + mem["next_block_weights"] + mem["svd_factors"] + mem["optimizer_state"]
    passes = mem["saved_weights"] + mem["saved_activations"] + mem["backward_transient"] + mem["batch_io"]
    # GPTQ and OAC accumulate their Hessians during their passes over the tokens; --lowrank after
    # training, once the SVD factors and Adam's state are freed (lsiq.block.calibrate_block)
    steady = held + passes + (method_hess if hess and not cfg.trains else 0)
    solve_phase = block + mem["next_block_weights"] + mem["solve_hessians"] + mem["solve_transient"] if solve else 0
    setup = block + mem["next_block_weights"] + mem["svd_factors"] + svd
    # the passes that do not train: the block, the weights it runs on (RTN's, the calibrated ones
    # dequantized), a micro-batch's activations, and its inputs, targets and outputs
    mem["forward_activations"] = fwd_act
    forward = block + mem["next_block_weights"] + F32 * lin + fwd_act + 3 * F32 * tokens_fwd * a.hidden
    if oac:  # the loss gradient at the head, once per run, at the same micro-batch
        mem["oac_head"] = F32 * (a.vocab_size * a.hidden + tokens_fwd * (OAC_HEAD_LOGITS * a.vocab_size + 2 * a.hidden))
        forward = max(forward, mem["oac_head"])
    mem.update(phase_setup=setup, phase_steady=steady, phase_forward=forward, phase_solve=solve_phase)
    mem["peak"] = max(steady, setup, forward, solve_phase)
    return mem


def host_plan(p: PlanConfig) -> dict[str, int]:
    """Host RAM per worker: its share of the three activation caches (OAC: and of the gradient at
    every block's output) and the block's FP tensors (cross-layer: two blocks')."""
    share = math.ceil(p.nsamples / p.gpus)
    cache = share * p.seqlen * p.arch.hidden * F32
    blocks = 2 if p.calib.cross_layer else 1
    return {"activation_caches": 3 * cache,
            # OAC: dL/d(output) of every block, from the FP pass until the block is calibrated (the
            # pass's boundary activations are dropped as the gradients are made: never both at once)
            "oac_caches": p.arch.num_layers * cache if _method(p.calib).needs_output_grads else 0,
            "block_tensors": blocks * F32 * sum(m * n for m, n in p.arch.linear_shapes().values())}


def svd_value_bytes(p: PlanConfig) -> int:
    """Bytes per value of LSI's SVDs: CalibConfig.svd_dtype, "auto" being the hardware's (Hardware.svd_bytes)."""
    return {"float64": F64, "float32": F32}.get(p.calib.svd_dtype, p.hw.svd_bytes)


def svd_seconds(p: PlanConfig, out_features: int, in_features: int) -> float:
    """Seconds of one linear's SVD for LSI (CalibConfig.svd): the factorisation at --svd-tflops
    ("full") or --eigh-tflops ("gram"), in float64 no faster than --fp64-tflops; the Gram route's
    two matmuls at the matmul rate of the SVD's dtype."""
    f64 = svd_value_bytes(p) == F64
    fact_rate = p.hw.eigh_tflops if p.calib.svd == "gram" else p.hw.svd_tflops
    fact_rate = min(fact_rate, p.hw.fp64_tflops) if f64 else fact_rate
    mm_rate = p.hw.fp64_tflops if f64 else p.hw.tflops
    return (svd_flops(out_features, in_features, p.calib.svd) / (fact_rate * 1e12)
            + svd_matmul_flops(out_features, in_features, p.calib.svd) / (mm_rate * 1e12))


def solve_flops(p: PlanConfig) -> list[tuple[int, int]]:
    """FLOPs of one block's Hessians and solves on each worker, as (matrix products and blocked
    Cholesky factors, which run near matmul speed; eigendecompositions and SVDs, which do not):
    accumulating the Hessians / autocorrelations over its tokens (2 n^2 per token and group of
    linears that share an input; OAC: per linear) and,
    repeated on every worker, GPTQ's column updates (m n^2) and Cholesky factors (2 n^3); shared out
    between the workers (svd_owners), the low-rank corrections: for qera R's Cholesky factor L
    (n^3 / 3), E L (2 m n^2), B L^{-1} (r n^2) and E L's SVD; the SVD for lqer and svd (svd builds
    no autocorrelation)."""
    cfg, shapes = p.calib, p.arch.linear_shapes()
    local_tokens = math.ceil(p.nsamples / p.gpus) * p.seqlen

    def accumulate(groups: tuple[tuple[str, ...], ...]) -> int:
        return sum(2 * local_tokens * shapes[g[0]][1] ** 2 for g in groups)

    mm = 0
    if _method(cfg).needs_hessians(cfg):
        mm += accumulate(hessian_groups(p.arch, cfg)) + sum(m * n * n + 2 * n**3 for m, n in shapes.values())
    if cfg.lowrank is None:
        return [(mm, 0)] * p.gpus
    if cfg.lowrank != "svd":
        mm += accumulate(p.arch.input_groups)
    per = {k: ((n**3 // 3 + 2 * m * n * n + cfg.rank * n * n) if cfg.lowrank == "qera" else 0, svd_flops(m, n))
           for k, (m, n) in shapes.items()}
    owners = svd_owners(shapes, p.gpus)
    return [(mm + sum(per[k][0] for k in per if owners[k] == r), sum(per[k][1] for k in per if owners[k] == r))
            for r in range(p.gpus)]


def solve_times(p: PlanConfig) -> list[float]:
    """Each worker's seconds of Hessians and solves: products at the matmul rate of the solve
    dtype (--tflops, or --fp64-tflops for float64); eigendecompositions and SVDs at --svd-tflops
    (cuSOLVER's are far from matmul speed), and in float64 no faster than its matmuls; GPTQ's
    column loop at --gptq-column-us per input column."""
    if solve_bytes(p.calib) == F64:
        mm_rate, fact_rate = p.hw.fp64_tflops, min(p.hw.fp64_tflops, p.hw.svd_tflops)
    else:
        mm_rate, fact_rate = p.hw.tflops, p.hw.svd_tflops
    columns = sum(n for _, n in p.arch.linear_shapes().values()) if _method(p.calib).needs_hessians(p.calib) else 0
    return [mm / (mm_rate * 1e12) + fact / (fact_rate * 1e12) + columns * p.hw.gptq_column_us * 1e-6
            for mm, fact in solve_flops(p)]



def time_plan(p: PlanConfig, recompute: bool, unit: bool = False) -> dict[str, float]:
    """Seconds per block by part, and hours for the model. Token work divides over workers; the
    weight-side work of each step (LSI recomposition, LET, LWC) is repeated on each; the SVDs are
    shared out (the slowest worker's share, then the factors it receives). ``unit``: a unit of a
    mixture-of-experts block (lsiq.moe), which measures no loss and feeds no next block, and whose FP
    targets are recomputed for every batch it trains on."""
    a, cfg, hw = p.arch, p.calib, p.hw
    shapes = a.linear_shapes()
    lin = sum(m * n for m, n in shapes.values())
    flops_per_token = 2 * lin + 2 * p.seqlen * a.n_heads * a.head_dim  # matmuls + causal attention
    fwd_passes: float = 0 if unit else 4  # FP targets, loss before, loss after, the next block's inputs
    if cfg.uses_let and cfg.abits < 16:
        fwd_passes += 1  # SmoothQuant-style LET init statistics
    m_ = _method(cfg)
    if m_.needs_hessians(cfg) and not m_.needs_output_grads:
        fwd_passes += 1  # the Hessians' pass (GPTQ, or a trained method's GPTQ start)
    # (a backward for the input gradient only is one matmul per linear: a forward's FLOPs)
    if m_.needs_output_grads:
        fwd_passes += 2  # the Hessian pass: the FP forward recomputed, and its backward
    if cfg.lowrank in ("qera", "lqer"):
        fwd_passes += 1  # the autocorrelation pass of the quantized block
    steps = cfg.steps_for(p.nsamples) if cfg.trains else 0
    sample_passes = steps * cfg.batch_size / p.nsamples  # training passes over the calibration set
    if unit:
        fwd_passes += sample_passes  # the FP targets of every batch
    train_passes = 3 * sample_passes  # forward + backward (input and weight gradients)
    if cfg.cross_layer:
        train_passes += 3 * sample_passes  # block i+1: its target, its forward, its backward
    local_tokens = math.ceil(p.nsamples / p.gpus) * p.seqlen
    train_tflops = hw.bf16_tflops if cfg.precision == "bf16" else hw.tflops
    tokens_s = local_tokens * flops_per_token * (fwd_passes / (hw.tflops * 1e12) + train_passes / (train_tflops * 1e12))
    recompose = sum(2 * m * n * min(m, n) for m, n in shapes.values()) if cfg.uses_lsi else 0
    # LSI: U diag(dS) V^T forward, its gradient backward, once more when recomputing
    weight_flops = recompose * (3 if recompute else 2)
    traffic = m_.weight_traffic.get(cfg.precision, (0.0, 0.0))[int(recompute)] if cfg.trains else 0.0
    weight_bytes = traffic * F32 * lin
    step_weight_s = weight_flops / (train_tflops * 1e12) + weight_bytes / (hw.mem_gbs * 1e9)
    allreduce_bytes = F32 * trainable_params(a, cfg) if p.gpus > 1 else 0
    ring = 2 * (p.gpus - 1) / p.gpus * 8 / (hw.link_gbps * 1e9)  # seconds per byte all-reduced (ring)
    step_comm_s = ring * allreduce_bytes if p.gpus > 1 else 0.0
    # every worker's Hessians are summed once per block (GPTQ/OAC, and again for --lowrank)
    rounds = ([hessian_groups(a, cfg)] if m_.needs_hessians(cfg) else []) + ([a.input_groups] if cfg.lowrank in
                                                                            ("qera", "lqer") else [])
    hess_comm_s = ring * sum(hessian_bytes(a, solve_bytes(cfg), g) for g in rounds) if p.gpus > 1 else 0.0
    svd_s = svd_wait = 0.0
    if cfg.uses_lsi:  # each worker computes its share of the SVDs, then receives the others' factors
        owners = svd_owners(shapes, p.gpus, cfg.svd)
        load = [sum(svd_seconds(p, *shapes[k]) for k in shapes if owners[k] == r) for r in range(p.gpus)]
        received = max(sum(factor_bytes(*shapes[k]) for k in shapes if owners[k] != r) for r in range(p.gpus))
        svd_s = max(load) + received * 8 / (hw.link_gbps * 1e9)
        svd_wait = max(load) - min(load)
    times = solve_times(p)
    solve_s = max(times)
    # the longest a worker sits in one collective while another computes alone (the first SVD
    # broadcast; the low-rank solves' failure flag): pipeline.quantize --collective-timeout must exceed it
    wait_s = max(svd_wait, max(times) - min(times)) if p.gpus > 1 else 0.0
    oac_s = 0.0
    if m_.needs_output_grads:  # the run's FP pass before the blocks, per block: forward, then recomputed
        # forward and backward in reverse; and the head's logits and their gradient, shared out
        head = 2 * 2 * a.hidden * a.vocab_size * local_tokens / a.num_layers  # logits, input gradient
        oac_s = (3 * local_tokens * flops_per_token + head) / (hw.tflops * 1e12)
    block_s = svd_s + tokens_s + steps * (step_weight_s + step_comm_s) + hess_comm_s + solve_s + oac_s
    return {"steps_per_block": steps, "svd_s": svd_s, "tokens_s": tokens_s, "weight_s": steps * step_weight_s,
            "allreduce_s": steps * step_comm_s + hess_comm_s, "allreduce_bytes_per_step": allreduce_bytes,
            "solve_s": solve_s, "collective_wait_s": wait_s, "oac_pass_s": oac_s, "block_s": block_s,
            "hours": a.num_layers * block_s / 3600}


def forward_batches(p: PlanConfig) -> list[int]:
    """Forward micro-batches to try, largest first: the one set, or a worker's share of the batch
    (quantize's default) halved down to 1."""
    if p.calib.forward_batch_size:
        return [p.calib.forward_batch_size]
    b = min(p.calib.forward_batch(p.gpus), math.ceil(p.nsamples / p.gpus))
    out = [b]
    while b > 1:
        b = (b + 1) // 2
        out.append(b)
    return out


def _recompute_options(p: PlanConfig) -> list[bool]:
    """--recompute-weights as the values to try, in order of preference (it costs time)."""
    return {"on": [True], "off": [False], "auto": [False, True]}[p.recompute]


def _settings(p: PlanConfig, default_fb: int) -> dict[str, Any]:
    """The plan's calibration settings (the flags it renders for pipeline.quantize)."""
    c = p.calib
    return {"method": c.method, "wbits": c.wbits, "abits": c.abits, "cross_layer": c.cross_layer,
            "lowrank": c.lowrank, "rank": c.rank, "group_size": c.group_size, "nsamples": p.nsamples,
            "seqlen": p.seqlen, "epochs": c.epochs, "steps": c.steps, "batch_size": c.batch_size,
            "forward_batch_size": c.forward_batch_size, "forward_batch_default": c.forward_batch_size == default_fb,
            "precision": c.precision, "solve_dtype": "float64" if solve_bytes(c) == F64 else "float32",
            "svd": c.svd, "svd_dtype": "float64" if svd_value_bytes(p) == F64 else "float32"}


def _architecture(p: PlanConfig) -> dict[str, Any]:
    """What the plan read of the block: its family, linears, input groups and LET pairs."""
    a = p.arch
    return {"family": a.name, "model_type": a.model_type, "linears": a.linear_shapes(),
            "input_groups": [list(g) for g in a.input_groups],
            "let_pairs": [x.name for x in a.let_pairs if p.calib.let_down or not x.optional], "unpaired": a.unpaired}


def make_plan(p: PlanConfig) -> dict[str, Any]:
    """Choose recomputation (when auto) and the forward micro-batch (when unset), and assemble the
    plan: the first that fits, recomputation last (it costs time; a smaller forward batch hardly does).
    A mixture-of-experts model: :func:`make_moe_plan`."""
    if getattr(p.arch, "moe", False):
        return make_moe_plan(p)
    default_fb = p.calib.forward_batch(p.gpus)
    for recompute, fb in itertools.product(_recompute_options(p), forward_batches(p)):  # the first that fits
        q = dataclasses.replace(p, calib=dataclasses.replace(p.calib, forward_batch_size=fb))
        mem = memory_plan(q, recompute)
        if mem["peak"] <= p.gpu_mem:
            break
    p = q
    t = time_plan(p, recompute)
    plan = {"fits": mem["peak"] <= p.gpu_mem, "hours": round(t["hours"], 3), "per_worker_bytes": mem["peak"],
            "gpu_mem_bytes": p.gpu_mem, "gpus": p.gpus, "recompute_weights": recompute,
            "memory": mem, "host": host_plan(p), "time": {k: round(v, 3) for k, v in t.items()},
            "settings": _settings(p, default_fb),
            "hardware": asdict(p.hw), "blocks": p.arch.num_layers, "hessian_rounds": hessian_rounds(p.calib),
            "architecture": _architecture(p)}
    if p.target_hours is not None:
        plan["target_hours"] = p.target_hours
        plan["meets_target"] = plan["fits"] and t["hours"] <= p.target_hours
    return plan


# ---------------------------------------------------------------------------------------- mixture-of-experts blocks
# A mixture-of-experts block is calibrated in stages (lsiq.moe): its attention on the samples each
# worker holds, as a dense block's linears are; then its MLP's units (the shared experts, the routed
# experts in groups of --expert-group), each by one worker on every sample, results broadcast. The
# layer itself (every expert's weights, float32) stays on the device throughout; each unit's working
# memory (a group's copies of its experts, Hessians, optimizer state, activations) comes on top, one
# unit at a time. The dense formulas above are applied to each unit as to a block of its linears (their
# coefficients were measured on dense blocks, not on expert groups); the rest is counted from the code.


@dataclass(frozen=True)
class StageArch:
    """A unit of a mixture-of-experts block (lsiq.moe.UnitArch) as the dense formulas read a block:
    its linears, input groups and LET pairs, and the widths of what its passes hold per token
    (``hidden``: its output, for a group every expert's on every token; ``intermediate``: its MLPs')."""

    unit: UnitArch
    hidden: int
    intermediate: int
    n_heads: int = 1
    n_kv_heads: int = 1
    head_dim: int = 0  # 0: no attention in the unit
    num_layers: int = 1
    vocab_size: int = 0

    @property
    def linears(self) -> tuple[str, ...]:
        return self.unit.linears

    @property
    def input_groups(self) -> tuple[tuple[str, ...], ...]:
        return self.unit.input_groups

    @property
    def let_pairs(self) -> tuple[Any, ...]:
        return self.unit.let_pairs

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        return self.unit.linear_shapes()

    def let_parameters(self, down: bool = False) -> int:
        return self.unit.let_parameters(down)


def moe_units(arch: BlockArch, cfg: CalibConfig, group: int) -> dict[str, UnitArch]:
    """The units of a mixture-of-experts block, as lsiq.moe builds them: the attention, the shared
    experts (if any), and one group of ``group`` routed experts."""
    units = {"attention": attention_unit(arch)}
    shared = shared_unit(arch)
    if shared is not None:
        units["shared experts"] = shared[1]
    units["expert group"] = group_unit(arch, list(range(group)), cfg.routed_only)
    return units


def expert_group_sizes(p: PlanConfig) -> list[int]:
    """Expert group sizes to try, largest first: the one set, or quantize's default (the experts
    split evenly over the workers) halved down to one expert."""
    if p.calib.expert_group:
        return [min(p.calib.expert_group, p.arch.experts)]
    g = len(expert_groups(list(range(p.arch.experts)), 0, p.gpus)[0])
    out = [g]
    while g > 1:
        g = (g + 1) // 2
        out.append(g)
    return out


def _stages(p: PlanConfig, group: int) -> dict[str, tuple[PlanConfig, bool]]:
    """Each unit as a plan of its own: (the PlanConfig the dense formulas read, whether its module is a
    copy beside the layer). The attention is shared out over the workers' samples; the shared experts
    and a group are calibrated by one worker on all samples."""
    a = p.arch
    # multi-head latent attention: per head, q.k over qk_nope + qk_rope and the values' v_head
    head_dim = (a.mla[2] + a.mla[3] + a.mla[4]) // 2 if a.mla else a.head_dim
    widths = {"attention": (a.hidden, 0, a.n_heads, a.n_kv_heads, head_dim),
              "shared experts": (a.hidden, a.shared_width, 1, 1, 0),
              "expert group": (group * a.hidden, group * a.expert_width, 1, 1, 0)}
    out = {}
    for name, unit in moe_units(a, p.calib, group).items():
        h, i, heads, kv, hd = widths[name]
        stage = StageArch(unit, h, i, heads, kv, hd, vocab_size=a.vocab_size)
        gpus = p.gpus if name == "attention" else 1
        out[name] = (dataclasses.replace(p, arch=stage, gpus=gpus), name == "expert group")
    return out


def _results_bytes(shapes: dict[str, tuple[int, int]], cfg: CalibConfig) -> int:
    """Bytes of the calibrated linears held until the block's result is assembled: uint8 codes, the
    float32 scales and zero points of their groups, and float32 low-rank factors."""
    n = 0
    for m, k in shapes.values():
        n += m * k + 2 * F32 * m * cfg.spec.groups(k)
        if cfg.lowrank is not None:
            r = min(cfg.rank, m, k)
            n += F32 * r * (m + k)
    return n


def moe_memory_plan(p: PlanConfig, recompute: bool, group: int) -> dict[str, int]:
    """Peak bytes on one worker's device while it calibrates a mixture-of-experts block, by part
    (``phase_*``: the attention stage, the MLP's units, and the passes of the whole layer)."""
    a, cfg = p.arch, p.calib
    mem = {"layer_weights": F32 * sum(math.prod(s) for s in a.tensor_shapes().values()),
           "results": _results_bytes(a.linear_shapes(), cfg)}
    for name, (q, copy) in _stages(p, group).items():
        sub = memory_plan(q, recompute)
        mem[name.replace(" ", "_") + "_stage"] = sub["peak"] - (0 if copy else sub["block_weights"])
    # the whole layer's passes (FP targets, RTN's error, the MLP's inputs and the router's choice,
    # the next block's inputs): per token the attention's, the shared experts' and the top-k experts'
    tokens_fwd = min(cfg.forward_batch(p.gpus), math.ceil(p.nsamples / p.gpus)) * p.seqlen
    routed = StageArch(attention_unit(a), a.hidden, a.shared_width + a.top_k * a.expert_width, a.n_heads, a.n_kv_heads)
    per_token = forward_floats_per_token(routed, p.seqlen, p.hw.gqa_scores) + a.experts + 3 * a.hidden
    mem["forward_activations"] = int(F32 * tokens_fwd * per_token)
    layer = mem["layer_weights"]
    units = max(mem["shared_experts_stage"] if "shared_experts_stage" in mem else 0, mem["expert_group_stage"])
    mem.update(phase_attention=layer + mem["attention_stage"], phase_experts=layer + mem["results"] + units,
               phase_forward=layer + mem["results"] + mem["forward_activations"])
    mem["peak"] = max(mem["phase_attention"], mem["phase_experts"], mem["phase_forward"])
    return mem


def moe_time_plan(p: PlanConfig, recompute: bool, group: int) -> dict[str, Any]:
    """Seconds per mixture-of-experts block by part: the attention stage (data-parallel), the whole
    layer's passes, the MLP's units (each on one worker, on all samples: the slowest worker's share,
    unit_owners as lsiq.moe assigns them), gathering every sample's MLP inputs and broadcasting the
    units' results."""
    a, cfg, hw = p.arch, p.calib, p.hw
    stages = _stages(p, group)
    att = time_plan(stages["attention"][0], recompute, unit=True)
    units = [("shared experts", stages["shared experts"][0])] if "shared experts" in stages else []
    for ids in expert_groups(list(range(a.experts)), group, p.gpus):
        q = stages["expert group"][0] if len(ids) == group else _stages(p, len(ids))["expert group"][0]
        units.append((f"experts {ids[0]}-{ids[-1]}", q))
    seconds = [time_plan(q, recompute, unit=True)["block_s"] for _, q in units]
    shapes = [q.arch.linear_shapes() for _, q in units]
    owners = unit_owners([sum(m * n for m, n in s.values()) for s in shapes], p.gpus)
    load = [sum(t for t, o in zip(seconds, owners, strict=True) if o == r) for r in range(p.gpus)]
    sizes = [_results_bytes(s, cfg) for s in shapes]
    received = max(sum(b for b, o in zip(sizes, owners, strict=True) if o != r) for r in range(p.gpus))
    # whole-layer passes: FP targets, RTN's error and the next inputs (3); the attention alone for its
    # FP targets and the MLP's inputs (2); per token the routed layer's matmuls and the attention's
    shp = a.linear_shapes()
    att_lin = sum(m * n for m, n in stages["attention"][0].arch.linear_shapes().values())
    expert_lin = sum(m * n for n_, (m, n) in shp.items() if n_ in a.expert_linears()) // a.experts
    shared_lin = sum(m * n for n_, (m, n) in shp.items() if n_ in a.shared_linears)
    attention = 2 * p.seqlen * a.n_heads * stages["attention"][0].arch.head_dim
    full = 2 * (att_lin + shared_lin + a.top_k * expert_lin + a.experts * a.hidden) + attention
    local_tokens = math.ceil(p.nsamples / p.gpus) * p.seqlen
    layer_s = local_tokens * (3 * full + 2 * (2 * att_lin + attention)) / (hw.tflops * 1e12)
    link = 8 / (hw.link_gbps * 1e9) if p.gpus > 1 else 0.0  # seconds per byte received
    others = p.nsamples - math.ceil(p.nsamples / p.gpus)
    gather_s = link * others * p.seqlen * (F32 * a.hidden + 8 * a.top_k)
    bcast_s = link * received
    block_s = att["block_s"] + layer_s + max(load) + gather_s + bcast_s
    return {"attention_s": att["block_s"], "layer_passes_s": layer_s, "experts_s": max(load),
            "experts_s_least": min(load), "gather_s": gather_s, "broadcast_s": bcast_s, "block_s": block_s,
            "units": len(units), "units_per_worker": max(owners.count(r) for r in range(p.gpus)),
            "steps_per_unit": cfg.steps_for(p.nsamples) if cfg.trains else 0,
            "collective_wait_s": max(load) - min(load) + att["collective_wait_s"]}


def moe_host_plan(p: PlanConfig) -> dict[str, int]:
    """Host RAM per worker for a mixture-of-experts block: the dense plan's caches and block tensors,
    every sample's MLP inputs and router choices (gathered), and the layer's own weights kept while
    round-to-nearest's are swapped in (lsiq.moe.swapped)."""
    out = host_plan(p)
    out["mlp_inputs"] = p.nsamples * p.seqlen * (F32 * p.arch.hidden + 8 * p.arch.top_k)
    out["layer_backup"] = F32 * sum(math.prod(s) for s in p.arch.tensor_shapes().values())
    return out


def make_moe_plan(p: PlanConfig) -> dict[str, Any]:
    """The plan of a mixture-of-experts model: its mixture-of-experts layers choose recomputation,
    the expert group size (the largest that fits; quantize's --expert-group) and the forward
    micro-batch, in that order of preference; its dense layers (DeepSeek's first three) are planned
    as dense blocks. Refuses what mixture-of-experts blocks cannot do (ValueError)."""
    a = p.arch
    refusal = moe_unsupported(p.calib)
    if refusal:
        raise ValueError(f"{a.name} (mixture of experts): {refusal} is not supported for mixture-of-experts models")
    default_fb = p.calib.forward_batch(p.gpus)
    for recompute, group, fb in itertools.product(_recompute_options(p), expert_group_sizes(p), forward_batches(p)):
        q = dataclasses.replace(p, calib=dataclasses.replace(p.calib, forward_batch_size=fb))
        mem = moe_memory_plan(q, recompute, group)
        if mem["peak"] <= p.gpu_mem:  # the first that fits
            break
    p = q
    t = moe_time_plan(p, recompute, group)
    counts = dict(collections.Counter(a.layer_kinds)) if a.layer_kinds else {"moe": a.num_layers}
    dense = None
    if counts.get("dense"):
        dense_arch = a.for_layer(a.layer_kinds.index("dense"))
        dense = make_plan(dataclasses.replace(p, arch=dense_arch, calib=dataclasses.replace(
            p.calib, forward_batch_size=0 if p.calib.forward_batch_size == default_fb else p.calib.forward_batch_size)))
    hours = (counts["moe"] * t["block_s"] + (counts.get("dense", 0) * dense["time"]["block_s"] if dense else 0)) / 3600
    peak = max(mem["peak"], dense["per_worker_bytes"] if dense else 0)
    plan = {"fits": mem["peak"] <= p.gpu_mem and (dense is None or dense["fits"]), "hours": round(hours, 3),
            "per_worker_bytes": peak, "gpu_mem_bytes": p.gpu_mem, "gpus": p.gpus, "recompute_weights": recompute,
            "memory": mem, "host": moe_host_plan(p), "time": {k: round(v, 3) for k, v in t.items()},
            "settings": _settings(p, default_fb) | {
                "expert_group": group, "routed_only": p.calib.routed_only,
                "expert_group_default": not p.calib.expert_group and group == expert_group_sizes(p)[0]},
            "hardware": asdict(p.hw), "blocks": a.num_layers, "layers": counts,
            "hessian_rounds": hessian_rounds(p.calib),
            "experts": {"routed": a.experts, "width": a.expert_width, "top_k": a.top_k, "shared_width": a.shared_width,
                        "mla": list(a.mla), "group": group, "units": t["units"],
                        "units_per_worker": t["units_per_worker"]},
            "architecture": _architecture(p)}
    if dense is not None:
        plan["dense"] = {k: dense[k] for k in ("fits", "per_worker_bytes", "recompute_weights", "memory", "time")}
    if p.target_hours is not None:
        plan["target_hours"] = p.target_hours
        plan["meets_target"] = plan["fits"] and hours <= p.target_hours
    return plan


def load_arch(path: str) -> BlockArch:
    """BlockArch from a config.json (a file, a folder holding one, or an fsspec URL of either)."""
    from transformers import AutoConfig

    from pipeline.storage import filesystem

    fs, root = filesystem(path)
    if fs.isdir(root):
        root = root.rstrip("/") + "/config.json"
    try:
        data = json.loads(fs.cat_file(root))
    except FileNotFoundError:
        raise BadInput(f"no model config at {path}") from None
    except ValueError as e:
        raise BadInput(f"{path} is not valid JSON ({e})") from None
    if "model_type" not in data:
        raise BadInput(f"{path} has no model_type: not a transformers config.json")
    try:
        config = AutoConfig.for_model(**data)
        family = family_for(config.model_type)
        text = config.get_text_config()
        if family is not None and family.unsupported and text is not config:
            config = text  # a multimodal checkpoint (Gemma 3): plan its language model
        return BlockArch.from_config(config)
    except (UnsupportedArchitecture, ValueError) as e:
        raise BadInput(f"{e}") from None


PHASES = {"setup": "setup (the SVDs)", "steady": "passes over the tokens", "solve": "Hessians' solves",
          "forward": "passes that do not train (targets, losses, next inputs)"}


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _budget(s: dict[str, Any]) -> str:
    return f"{s['steps']} steps" if s["steps"] else f"{s['epochs']} epochs"


def render(plan: dict[str, Any]) -> str:
    """The human-readable plan (the JSON line follows it)."""
    s, mem, t = plan["settings"], plan["memory"], plan["time"]
    arch = plan["architecture"]
    pairs = ", ".join(arch["let_pairs"]) or "none"
    lines = [f"architecture: {arch['family']} (model_type {arch['model_type']}): {len(arch['linears'])} linears in "
             f"{len(arch['input_groups'])} input groups, LET pairs: {pairs}"]
    if arch["unpaired"]:
        lines.append(f"warning: {arch['unpaired']}")
    lines += [f"plan: {plan['blocks']} blocks, {s['method']} W{s['wbits']}A{s['abits']} g{s['group_size']}, "
             f"{s['nsamples']} x {s['seqlen']} tokens, {_budget(s)}, global batch {s['batch_size']}, "
             f"{plan['gpus']} workers x {_gib(plan['gpu_mem_bytes'])}",
             f"per-worker device memory (recompute weights: {'on' if plan['recompute_weights'] else 'off'}):"]
    for k, v in mem.items():
        if k != "peak" and not k.startswith("phase_") and v:
            lines.append(f"  {k:<20} {_gib(v):>12}")
    phase = peak_phase(mem)
    lines.append(f"  {'peak':<20} {_gib(mem['peak']):>12}  of {_gib(plan['gpu_mem_bytes'])} "
                 f"(during the {PHASES[phase]})")
    host = plan["host"]
    oac = f", OAC boundary caches {_gib(host['oac_caches'])}" if host["oac_caches"] else ""
    lines.append(f"per-worker host RAM: activation caches {_gib(host['activation_caches'])}{oac}, "
                 f"block tensors {_gib(host['block_tensors'])} (caches spill to disk above --activation-budget)")
    more = "".join(f" + {name} {t[k]:.1f}" for k, name in (("solve_s", f"{s['solve_dtype']} solves"),
                                                              ("oac_pass_s", "OAC pass"))
                   if t[k])
    lines.append(f"time per block: {t['block_s']:.1f} s = SVD {t['svd_s']:.1f} + tokens {t['tokens_s']:.1f} + "
                 f"weight side {t['weight_s']:.1f} + all-reduce {t['allreduce_s']:.1f}{more} "
                 f"({t['steps_per_block']} steps)")
    lines.append(f"estimate: {plan['hours']:.2f} h for the model")
    return "\n".join(lines + _flag_lines(plan))


def _flag_lines(plan: dict[str, Any]) -> list[str]:
    """The pipeline.quantize flags of a plan (and the notes that come with them)."""
    s, t = plan["settings"], plan["time"]
    lines = []
    flags = (f"--workers {plan['gpus']} --gpus-per-worker 1 --device cuda --method {s['method']} --wbits {s['wbits']} "
             f"--abits {s['abits']} --group-size {s['group_size']} --nsamples {s['nsamples']} --seqlen {s['seqlen']} "
             f"{'--steps ' + str(s['steps']) if s['steps'] else '--epochs ' + str(s['epochs'])} "
             f"--batch-size {s['batch_size']} --precision {s['precision']}")
    if not s["forward_batch_default"]:
        flags += f" --forward-batch-size {s['forward_batch_size']}"
    if s["cross_layer"]:
        flags += " --cross-layer"
    if s["lowrank"]:
        flags += f" --lowrank {s['lowrank']} --rank {s['rank']}"
    if plan["hessian_rounds"]:
        flags += f" --solve-dtype {s['solve_dtype']}"
    if "lsi" in methods.get(s["method"]).components:
        flags += f" --svd {s['svd']}" if s["svd"] != CalibConfig.svd else ""
        flags += f" --svd-dtype {s['svd_dtype']}" if s["svd_dtype"] == "float64" else ""
    if t["collective_wait_s"] > DEFAULT_COLLECTIVE_TIMEOUT / 2:  # a factor 2 for the throughputs being estimates
        flags += f" --collective-timeout {math.ceil(2 * t['collective_wait_s'] / 60) * 60}"
        lines.append(f"note: a worker waits about {t['collective_wait_s']:.0f} s in one collective while another "
                     f"computes an SVD or a low-rank solve alone; pass --collective-timeout (default "
                     f"{DEFAULT_COLLECTIVE_TIMEOUT:.0f} s) with twice that")
    if s.get("expert_group") and not s["expert_group_default"]:
        flags += f" --expert-group {s['expert_group']}"
    if s.get("routed_only"):
        flags += " --routed-only"
    lines.append(f"pipeline.quantize flags: {flags}{' --recompute-weights' if plan['recompute_weights'] else ''}")
    if "meets_target" in plan:
        lines.append(f"target {plan['target_hours']} h: {'met' if plan['meets_target'] else 'NOT met'}")
    return lines


def _units(ex: dict[str, Any]) -> str:
    groups = ex["units"] - bool(ex["shared_width"])
    shared = "the shared experts and " if ex["shared_width"] else ""
    return f"{shared}{groups} group{'s' if groups > 1 else ''} of {ex['group']} routed expert{'s' if ex['group'] > 1 else ''}"


MOE_PHASES = {"attention": "attention stage", "experts": "expert units", "forward": "passes of the whole layer"}


def render_moe(plan: dict[str, Any]) -> str:
    """The human-readable plan of a mixture-of-experts model (the JSON line follows it)."""
    s, mem, t, ex = plan["settings"], plan["memory"], plan["time"], plan["experts"]
    arch, layers = plan["architecture"], plan["layers"]
    shared = f", shared experts {ex['shared_width']} wide" if ex["shared_width"] else ""
    mla = ""
    if ex["mla"]:
        q, kv, nope, rope, v = ex["mla"]
        mla = f"; multi-head latent attention (q rank {q}, kv rank {kv}, q.k {nope} + {rope}, v {v} per head)"
    dense = f"{layers['dense']} dense layers, then " if layers.get("dense") else ""
    lines = [f"architecture: {arch['family']} (model_type {arch['model_type']}): {dense}{layers['moe']} "
             f"mixture-of-experts layers of {ex['routed']} routed experts {ex['width']} wide, {ex['top_k']} per "
             f"token{shared}{mla}",
             f"plan: {plan['blocks']} blocks, {s['method']} W{s['wbits']}A{s['abits']} g{s['group_size']}, "
             f"{s['nsamples']} x {s['seqlen']} tokens, {_budget(s)}, global batch {s['batch_size']}, "
             f"{plan['gpus']} workers x {_gib(plan['gpu_mem_bytes'])}",
             f"experts: {'the routed tokens of each' if s['routed_only'] else 'every token through every expert'}; "
             f"{_units(ex)}, each calibrated by one worker on all samples, at most {ex['units_per_worker']} per "
             "worker",
             f"per-worker device memory, mixture-of-experts layer (recompute weights: "
             f"{'on' if plan['recompute_weights'] else 'off'}):"]
    for k, v in mem.items():
        if k != "peak" and not k.startswith("phase_") and v:
            lines.append(f"  {k:<22} {_gib(v):>12}")
    phase = max(MOE_PHASES, key=lambda k: mem[f"phase_{k}"])
    lines.append(f"  {'peak':<22} {_gib(mem['peak']):>12}  of {_gib(plan['gpu_mem_bytes'])} "
                 f"(during the {MOE_PHASES[phase]})")
    if "dense" in plan:
        d = plan["dense"]
        lines.append(f"dense layer: peak {_gib(d['per_worker_bytes'])} (during the {PHASES[peak_phase(d['memory'])]}), "
                     f"{d['time']['block_s']:.1f} s per block")
    host = plan["host"]
    lines.append(f"per-worker host RAM: activation caches {_gib(host['activation_caches'])}, block tensors "
                 f"{_gib(host['block_tensors'])}, the layer's weights kept while RTN's are swapped in "
                 f"{_gib(host['layer_backup'])}, every sample's MLP inputs {_gib(host['mlp_inputs'])}")
    lines.append(f"time per mixture-of-experts block: {t['block_s']:.1f} s = attention {t['attention_s']:.1f} + "
                 f"whole-layer passes {t['layer_passes_s']:.1f} + expert units {t['experts_s']:.1f} (the busiest "
                 f"worker; the least busy {t['experts_s_least']:.1f}) + gathering inputs {t['gather_s']:.1f} + "
                 f"broadcasting results {t['broadcast_s']:.1f}")
    lines.append(f"estimate: {plan['hours']:.2f} h for the model")
    return "\n".join(lines + _flag_lines(plan))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.plan",
        description="Per-worker memory plan and time estimate for quantizing a model with pipeline.quantize "
        "on N GPU workers, from its config.json alone. Refuses (exit 1) a plan that does not fit. "
        "The last stdout line is a JSON object with fits, hours and per_worker_bytes.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every calibration flag has pipeline.quantize's default (the same help); a plan for a 70B-class run "
               "usually asks for more tokens and 4 bits.\n\nexample:\n  python -m pipeline.plan --model-config "
               "clusters/models/llama-2-70b/config.json --gpus 8 --gpu-mem 24GB --precision bf16 --wbits 4 "
               "--group-size 128 --nsamples 128 --seqlen 2048")
    p.add_argument("--model-config", required=True, help="config.json of the model (file, folder or fsspec URL)")
    p.add_argument("--gpus", type=int, required=True, help="data-parallel workers, one GPU each (--workers)")
    p.add_argument("--gpu-mem", type=parse_bytes, required=True, help="memory of one GPU, e.g. 24GB")
    groups = add_config_args(p, choices={"method": methods.names()}, skip=("recompute_weights", "seed"),
                             titles={"method": "how the trained methods learn", "low-rank": "low-rank corrections"})
    add_budget_args(groups["calibration"], QuantizeConfig.nsamples, QuantizeConfig.seqlen)
    p.add_argument("--recompute-weights", choices=["auto", "on", "off"], default="auto",
                   help="auto: recompute the calibrated weights in backward only when the plan does not fit without")
    hw = p.add_argument_group("hardware (per worker)")
    hw.add_argument("--tflops", type=float, default=Hardware.tflops, help="sustained fp32 matmul TFLOP/s")
    hw.add_argument("--bf16-tflops", type=float, default=Hardware.bf16_tflops, help="sustained bf16 matmul TFLOP/s")
    hw.add_argument("--mem-gbs", type=float, default=Hardware.mem_gbs, help="sustained memory bandwidth, GB/s")
    hw.add_argument("--svd-tflops", type=float, default=Hardware.svd_tflops, help="sustained SVD TFLOP/s (--svd full)")
    hw.add_argument("--eigh-tflops", type=float, default=Hardware.eigh_tflops,
                    help="sustained TFLOP/s of the symmetric eigensolver (--svd gram)")
    hw.add_argument("--fp64-tflops", type=float, default=Hardware.fp64_tflops,
                    help="sustained float64 TFLOP/s (GPTQ/OAC Hessians and solves, --lowrank, with --solve-dtype float64)")
    hw.add_argument("--link-gbps", type=float, default=Hardware.link_gbps, help="all-reduce bandwidth, Gbit/s")
    hw.add_argument("--gptq-column-us", type=float, default=Hardware.gptq_column_us,
                    help="GPTQ/OAC: microseconds per input column of the column loop beyond its FLOPs")
    p.add_argument("--target-hours", type=float, default=None, help="also report whether the estimate meets this")
    return p


def parse_plan_args(argv: list[str] | None = None) -> PlanConfig:
    a = build_parser().parse_args(argv)
    if a.gpus < 1:
        raise BadInput(f"--gpus must be >= 1, got {a.gpus}")
    if a.gpu_mem <= 0:
        raise BadInput("--gpu-mem must be > 0")
    arch = load_arch(a.model_config)
    try:
        calib = per_worker_batch(config_from_args(a, CalibConfig), a.batch_size, a.gpus)
        return PlanConfig(arch=arch, gpus=a.gpus, gpu_mem=a.gpu_mem, calib=calib, nsamples=a.nsamples,
                          seqlen=a.seqlen, recompute=a.recompute_weights, target_hours=a.target_hours,
                          hw=Hardware(tflops=a.tflops, bf16_tflops=a.bf16_tflops, mem_gbs=a.mem_gbs,
                                      svd_tflops=a.svd_tflops, fp64_tflops=a.fp64_tflops, link_gbps=a.link_gbps,
                                      gptq_column_us=a.gptq_column_us, eigh_tflops=a.eigh_tflops))
    except ValueError as e:
        raise BadInput(f"{e}") from None


def main(argv: list[str] | None = None) -> int:
    p = parse_plan_args(argv)
    try:
        plan = make_plan(p)
    except ValueError as e:  # e.g. a group size that does not divide a linear's input width
        raise BadInput(f"{e}") from None
    print(render_moe(plan) if "experts" in plan else render(plan))
    if not plan["fits"] and "experts" in plan:
        need, have, mem = plan["per_worker_bytes"], plan["gpu_mem_bytes"], plan["memory"]
        if mem["layer_weights"] + mem["results"] > have:
            advice = (f"one mixture-of-experts layer's weights ({_gib(mem['layer_weights'])} in float32) and its "
                      "quantized linears stay on the device while its experts are calibrated: use GPUs with more memory")
        else:
            advice = ("the units' working memory does not fit even one expert at a time: lower --batch-size or "
                      "--seqlen, or use GPUs with more memory")
        print(f"error: does not fit: a worker needs {_gib(need)} at its peak and a GPU has {_gib(have)}; {advice}",
              file=sys.stderr)
    elif not plan["fits"]:
        need, have = plan["per_worker_bytes"], plan["gpu_mem_bytes"]
        mem = plan["memory"]
        if peak_phase(mem) == "solve":
            advice = ("its peak is the Hessians and solves of GPTQ/OAC/--lowrank, [in, in] matrices that no batch "
                      "size or worker count shrinks: use GPUs with more memory"
                      + (", or --solve-dtype float32" if plan["settings"]["solve_dtype"] == "float64" else ""))
        elif peak_phase(mem) == "forward" and plan["settings"]["forward_batch_size"] > 1:
            advice = ("its peak is the passes that do not train: lower --forward-batch-size (or leave it unset: the "
                      "plan then picks the largest that fits)")
        elif peak_phase(mem) == "forward":
            advice = ("its peak is a forward pass of one sample (--forward-batch-size 1) with the block's weights "
                      "twice: use GPUs with more memory, or a smaller --seqlen")
        else:
            advice = ("lower --batch-size (fewer samples per worker per step), use GPUs with more memory, or a "
                      "smaller --seqlen")
        print(f"error: does not fit: a worker needs {_gib(need)} at its peak and a GPU has {_gib(have)}; {advice}",
              file=sys.stderr)
    print(json.dumps(plan), flush=True)
    return 0 if plan["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())
