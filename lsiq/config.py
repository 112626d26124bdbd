"""Settings of block calibration, one typed dataclass. Each field carries its help text (and
choices) in its metadata: the command-line interfaces are generated from it (pipeline.cli), so a
default is written once. Fields whose default is None take the chosen method's own default
(lsiq.methods: e.g. the optimizer), filled in when the config is built."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lsiq.quantizer import QuantSpec

# This module imports no torch (the CLIs build --help from it); the modules that implement these
# choices import them from here.
LOWRANK_KINDS = ("qera", "lqer", "svd")  # lsiq.lowrank
SVD_METHODS = ("gram", "full")  # lsiq.lsi: through the Gram matrix, or torch.linalg.svd
PRECISIONS = ("fp32", "bf16")
SOLVE_DTYPES = ("auto", "float64", "float32")
OPTIMIZERS = ("adamw", "signsgd")
LR_SCHEDULES = ("constant", "linear")
LOSSES = ("mse", "token")
LWC_PARAMS = ("sigmoid", "linear")
ROUND_INITS = ("zero", "gptq")
GPTQ_ACTORDERS = ("static", "none")
# "method" is filled in by lsiq.methods (its registry); the CLI asks for the names there
GROUPS = ("quantization", "calibration", "method", "low-rank", "compute")


def opt(default: Any, help: str, group: str = "method", choices: tuple | None = None, cli: bool = True,
        flag: str | None = None) -> Any:
    """A config field with its help text, its CLI group and choices (see pipeline.cli)."""
    meta = {"help": help, "group": group, "choices": choices, "cli": cli, "flag": flag}
    return field(default=default, metadata=meta)


@dataclass
class CalibConfig:
    """Everything that decides how a block is calibrated."""

    method: str | None = opt(None, "calibration method; default: the best measured one for --wbits "
                             "(lsiq.methods.default_method)", group="quantization")
    wbits: int = opt(3, "weight bits (2-8)", group="quantization")
    abits: int = opt(16, "activation bits, dynamic per token; 16 = weight-only", group="quantization",
                     choices=(4, 6, 8, 16))
    group_size: int = opt(64, "weight group size along the input dimension; 0 = per output channel; it must divide "
                          "every linear's input size", group="quantization")
    sym: bool = opt(False, "symmetric weight grid (default: asymmetric, with a zero point)", group="quantization")
    # --- the calibration budget
    steps: int | None = opt(None, "optimizer steps per block; 0 = --epochs passes over the calibration samples; "
                            "default: the method's (0 when --epochs is given)", group="calibration")
    epochs: int = opt(None, "passes over the calibration samples per block, when --steps is 0; default: the method's",
                      group="calibration")
    batch_size: int = opt(None, "samples per optimizer step; default: the method's, raised to "
                          "one sample per worker with several data-parallel workers", group="calibration")
    forward_batch_size: int = opt(0, "samples per micro-batch of the passes that do not train (targets, losses, "
                                  "statistics, next inputs), per worker; 0 = a worker's share of --batch-size. Lower it "
                                  "when those passes set the memory peak (python -m pipeline.plan says when)",
                                  group="calibration")
    seed: int = opt(0, "seed of the calibration windows' draw and of training", group="calibration")
    # --- mixture-of-experts blocks (lsiq.moe)
    routed_only: bool = opt(False, "mixture-of-experts blocks: calibrate each expert on the tokens the router sends it "
                            "only (GPTQModel's way); default: every token through every expert for its statistics "
                            "and its loss (llm-compressor's calibrate-all-experts), the block's output still routed",
                            group="calibration")
    expert_min_tokens: float = opt(0.005, "mixture-of-experts blocks: an expert the router sends fewer than this "
                                   "fraction of the block's tokens is rounded to nearest instead of calibrated, and the "
                                   "report and the progress line name it (GPTQModel's 0.5 %%); 0 = calibrate every "
                                   "expert", group="calibration")
    expert_group: int = opt(0, "mixture-of-experts blocks: routed experts calibrated at a time (their copies, learned "
                            "state and statistics on the device together; python -m pipeline.plan says what fits); "
                            "data-parallel workers share the groups out; 0 = the experts split evenly over the workers",
                            group="compute")
    # --- how the trained methods learn (None: the method's default)
    optimizer: str | None = opt(None, "optimizer of the learnable parameters: adamw, or signsgd (each step moves "
                                "every parameter by its learning rate against its gradient's sign)", choices=OPTIMIZERS)
    lr_schedule: str | None = opt(None, "learning rates constant, or decaying linearly to 0 over the steps",
                                  choices=LR_SCHEDULES)
    keep_best: bool | None = opt(None, "keep the parameters of the step with the lowest training-batch loss "
                                 "(checked before each update; the first step's is the method's starting point)")
    average_tail: float | None = opt(None, "end on the mean of the parameters after each step of this last fraction "
                                     "of the steps (0 = off: the last step's, or the best one's with --keep-best, "
                                     "which it overrides)")
    loss: str | None = opt(None, "block-output loss: mse; token = each token's squared error over its FP output's mean "
                    "square (the massive activations of a few positions do not dominate it)", choices=LOSSES)
    lr_lwc: float | None = opt(None, "learning rate of the clipping factors (LWC); 0 with signsgd = 1 / steps")
    lwc_param: str | None = opt(None, "clipping factors as sigmoid(u) from u = 4 (OmniQuant) or as factors in [0, 1] "
                                "from 1, the round-to-nearest range (AutoRound)", choices=LWC_PARAMS)
    lr_let: float = opt(5e-3, "learning rate of LET's scales")
    let_init: str = opt("auto", "LET scale init; auto = SmoothQuant-style for weight-activation runs, ones for "
                        "weight-only", choices=("auto", "ones", "smooth"))
    let_alpha: float = opt(0.5, "SmoothQuant exponent of --let-init smooth", cli=False)
    let_down: bool | None = opt(None, "LET also scales up_proj's rows against down_proj's columns (AWQ's pair)")
    lr_lsi: float = opt(1e-2, "learning rate of LSI's singular-value increments")
    lsi_block_k: int = opt(0, "LSI: a learnable k x k block on the top-left of the singular values")
    lsi_relative: bool = opt(False, "LSI: learn the increment relative to each singular value (dS = S r)")
    sde_band: int = opt(1, "SDE: learnable diagonals on each side of the singular values' diagonal (0 = LSI)")
    # SDE's off-diagonal bands: at lr_lsi (1e-2) they mix singular directions too fast on small
    # layers (block loss rose on the tiny test block); 1e-3 lowered it there.
    lr_sde: float = opt(1e-3, "SDE: learning rate of the bands")
    lr_round: float = opt(0.0, "learning rate of the learned rounding offsets; 0 = --lr-round-steps / steps")
    lr_round_steps: float | None = opt(None, "with --lr-round 0: the rounding offsets' learning rate times the steps "
                                       "(AutoRound's rule: 1; with a linear decay the offsets can travel half of "
                                       "this many grid steps)")
    round_init: str | None = opt(None, "learned rounding starts from round-to-nearest (zero offsets) or from GPTQ's "
                                 "rounding on the same grid", choices=ROUND_INITS)
    gptq_damp: float = opt(0.01, "GPTQ: damping, a fraction of the Hessian's mean diagonal")
    gptq_actorder: str = opt("static", "GPTQ: column order; static = by decreasing Hessian diagonal with group "
                             "parameters from the FP weight (llm-compressor's default), none = the original order",
                             choices=GPTQ_ACTORDERS)
    cross_layer: bool = opt(False, "cross-layer learning (CQE+): block i's loss adds the error of block i+1 (full "
                            "precision) fed with block i's quantized output; holds two blocks' FP tensors at a time")
    cross_layer_weight: float = opt(1.0, "weight of the block i+1 term of --cross-layer")
    # --- low-rank corrections, computed after a block's weights are quantized
    lowrank: str | None = opt(None, "give each linear a rank --rank correction A B in float16, in closed form from the "
                              "block's inputs: qera uses their autocorrelation (minimises the output error), lqer its "
                              "diagonal, svd ignores them; stored in --format native only", group="low-rank",
                              choices=LOWRANK_KINDS)
    rank: int = opt(16, "rank of --lowrank corrections", group="low-rank")
    lowrank_damp: float = opt(1e-6, "damping of the autocorrelation's Cholesky factor", group="low-rank", cli=False)
    # --- compute
    recompute_weights: bool = opt(False, "rebuild each linear's calibrated weight in the backward pass instead of "
                                  "keeping its intermediates: several block-weight sizes less memory per step for about "
                                  "half again the weight-side compute (python -m pipeline.plan says when it is needed)",
                                  group="compute")
    precision: str = opt("fp32", "bf16: training steps under bfloat16 autocast (GPU tensor cores); targets, statistics "
                         "and the propagated activations stay float32", group="compute", choices=PRECISIONS)
    solve_dtype: str = opt("auto", "dtype of Hessians, autocorrelations and their solves; auto = float64 on a CPU, "
                           "float32 on a GPU (half the memory of the [in, in] matrices)", group="compute",
                           choices=SOLVE_DTYPES)
    svd: str = opt("gram", "how LSI/SDE take each linear's SVD: gram = from the smaller Gram matrix's eigenvectors "
                   "(2.9-4.5x less slow factorisation work on Llama shapes), full = LAPACK's/cuSOLVER's SVD",
                   group="compute", choices=SVD_METHODS)
    svd_dtype: str = opt("auto", "dtype of LSI's SVDs; auto = float64 on a CPU, float32 on a GPU", group="compute",
                         choices=SOLVE_DTYPES)
    # Smallest zero point of asymmetric grids (QuantSpec.zero_min): set from the output format (1
    # for GPTQ v1, which cannot store a zero of 0), not by users.
    zero_min: int = opt(0, "smallest zero point of an asymmetric grid", cli=False)

    def __post_init__(self) -> None:
        from lsiq import methods  # the registry imports the methods, which import this module

        if self.method is None:
            self.method = methods.default_method(self.wbits, self.abits)
        m = methods.get(self.method)  # a clear error for an unknown name
        if self.steps is None and self.epochs is not None:
            self.steps = 0  # passes were asked for: they decide the steps
        for key, value in m.defaults_for(self.wbits, self.abits).items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        for f in fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise ValueError(f"{f.name} must be one of {', '.join(map(str, choices))}, got {value!r}")
        from lsiq.quantizer import ActQuantizer

        ActQuantizer(self.abits)  # validates the activation bit width
        self.spec  # noqa: B018 - validates bits, group size and zero_min
        if self.epochs < 0 or self.batch_size < 1 or self.steps < 0:
            raise ValueError(f"epochs and steps must be >= 0 and batch_size >= 1, got epochs={self.epochs}, "
                             f"steps={self.steps}, batch_size={self.batch_size}")
        if self.forward_batch_size < 0:
            raise ValueError(f"forward_batch_size must be >= 0 (0: a worker's share of batch_size), "
                             f"got {self.forward_batch_size}")
        if not 0 <= self.average_tail <= 1:
            raise ValueError(f"average_tail must be between 0 and 1, got {self.average_tail}")
        if not 0 <= self.expert_min_tokens < 1:
            raise ValueError(f"expert_min_tokens is a fraction of the tokens, in [0, 1), got {self.expert_min_tokens}")
        if self.expert_group < 0:
            raise ValueError(f"expert_group must be >= 0 (0: split evenly over the workers), got {self.expert_group}")
        if self.sde_band < 0:
            raise ValueError(f"sde_band must be >= 0, got {self.sde_band}")
        if self.cross_layer and not self.trains:
            trained = ", ".join(n for n in methods.names() if methods.get(n).trains)
            raise ValueError(f"cross-layer learning needs a method that trains ({trained}) with steps or epochs > 0, "
                             f"not {self.method}")
        if self.lowrank is not None and self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        m.check(self)

    def forward_batch(self, world: int = 1) -> int:
        """Samples per micro-batch of one of ``world`` workers' passes that do not train."""
        return self.forward_batch_size or math.ceil(self.batch_size / world)

    def steps_for(self, nsamples: int) -> int:
        """Optimizer steps per block for ``nsamples`` calibration samples."""
        return self.steps or self.epochs * math.ceil(nsamples / self.batch_size)

    @property
    def spec(self) -> QuantSpec:
        from lsiq.quantizer import QuantSpec

        return QuantSpec(self.wbits, self.group_size, self.sym, self.zero_min)

    @property
    def components(self) -> frozenset[str]:
        """What the method learns (lsiq.trainable.COMPONENTS); empty for the closed-form methods."""
        from lsiq import methods

        return methods.get(self.method).components

    @property
    def uses_lwc(self) -> bool:
        return "lwc" in self.components

    @property
    def uses_let(self) -> bool:
        return "let" in self.components

    @property
    def uses_lsi(self) -> bool:
        """Learnable singular values (LSI; SDE adds bands beside the diagonal)."""
        return "lsi" in self.components

    @property
    def uses_rounding(self) -> bool:
        return "rounding" in self.components

    @property
    def band(self) -> int:
        return self.sde_band if "bands" in self.components else 0

    @property
    def trains(self) -> bool:
        return bool(self.components) and (self.steps > 0 or self.epochs > 0)
