"""The one interface every calibration method implements, and the registry that names them.

A method turns one FP decoder block plus its cached inputs into integer weights (``calibrate``)
and tells the pipeline and the planner what it needs and costs (its attributes), so neither
compares method names. Adding a method: one module in lsiq/methods that defines a Method (or a
TrainedMethod, lsiq.methods.trained) and calls :func:`register`, plus its line in
lsiq.methods.MODULES.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from lsiq.arch import BlockArch
from lsiq.parallel import SampleShard
from lsiq.results import QuantizedLinear

if TYPE_CHECKING:
    from lsiq.config import CalibConfig


@dataclass
class BlockJob:
    """Everything a method may use to calibrate one block (lsiq.block.calibrate_block builds it).

    ``inputs``: [N, L, hidden], the quantized stream (the previous quantized blocks' outputs);
    ``targets``: the FP block's outputs on the FP stream ``fp_inputs``; ``next_layer``: block i+1
    in FP (cross-layer learning); ``output_grads``: dL/d(block output) of the model's loss on the
    FP stream (methods with ``needs_output_grads``)."""

    layer: nn.Module
    layer_kwargs: dict[str, Any]
    inputs: torch.Tensor
    targets: torch.Tensor
    arch: BlockArch
    cfg: CalibConfig
    shard: SampleShard
    block_index: int = 0
    fp_inputs: torch.Tensor | None = None
    next_layer: nn.Module | None = None
    output_grads: torch.Tensor | None = None
    on_step: Callable[[int, int, float], None] | None = None


@dataclass
class Calibrated:
    """A method's result for one block: integer linears, the other (folded) tensors, the loss of
    every optimizer step, the number of learned parameters, and (when the config asks for low-rank
    corrections) each linear's FP weight in the block's calibrated coordinates."""

    linears: dict[str, QuantizedLinear]
    tensors: dict[str, torch.Tensor]
    losses: list[float] = field(default_factory=list)
    trainable_params: int = 0
    fp_weights: dict[str, torch.Tensor] | None = None


class Method:
    """A calibration method. Subclasses set the class attributes and implement :meth:`calibrate`."""

    name: ClassVar[str] = ""
    components: ClassVar[frozenset[str]] = frozenset()  # what it learns (lsiq.trainable.COMPONENTS)
    # per-linear [in, in] second-order statistics and a GPTQ solve per linear (memory and time)
    hessians: ClassVar[bool] = False
    needs_output_grads: ClassVar[bool] = False  # the model loss's gradient at every block (OAC's pass)
    # Defaults of the CalibConfig fields left None (its budget and how it learns)
    defaults: ClassVar[dict[str, Any]] = {
        "epochs": 5, "batch_size": 1, "optimizer": "adamw", "lr_schedule": "constant", "keep_best": False, "average_tail": 0.0,
        "lr_lwc": 1e-2, "lwc_param": "sigmoid", "let_down": False, "round_init": "zero", "steps": 0,
        "loss": "mse", "lr_round_steps": 1.0,
    }
    # What one optimizer step keeps for the backward pass and the memory traffic of its weight side,
    # in float32 weights of the block's linears, by precision: measured from the code with autograd's
    # saved-tensor hooks and a dispatch mode (tests/test_plan.py checks them; pipeline.plan uses them).
    saved_weights: ClassVar[dict[str, float]] = {}
    weight_traffic: ClassVar[dict[str, tuple[float, float]]] = {}  # (plain, --recompute-weights)

    @property
    def trains(self) -> bool:
        return bool(self.components)

    def defaults_for(self, wbits: int, abits: int = 16) -> dict[str, Any]:
        """The defaults at this bit width (a method whose best settings depend on it overrides this)."""
        return self.defaults

    def check(self, cfg: CalibConfig) -> None:
        """Refuse settings this method cannot use (a ValueError naming them)."""

    def needs_hessians(self, cfg: CalibConfig) -> bool:
        """Whether it builds an [in, in] Hessian per linear and runs GPTQ's solve on each."""
        return self.hessians

    def calibrate(self, job: BlockJob) -> Calibrated:
        raise NotImplementedError


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry (its module's name goes in lsiq.methods.MODULES)."""
    if not method.name or method.name in _REGISTRY:
        raise ValueError(f"method name {method.name!r} is empty or taken")
    _REGISTRY[method.name] = method
    return method


def get(name: str) -> Method:
    try:
        return _REGISTRY[name]
    except KeyError:
        from lsiq.methods import names

        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(names())}") from None


def registered() -> list[str]:
    """The names registered so far (lsiq.methods.names lists every method, imported or not)."""
    return list(_REGISTRY)
