"""The calibration methods, one module each, behind one interface (lsiq.methods.base.Method) and
one registry. ``get(name)`` returns a method, ``names()`` lists them in registration order,
``default_method(wbits, abits)`` is what a user gets without choosing.

The table below is the registry's table of contents: it is read without importing any method (or
torch), so that a command's ``--help`` is quick; ``get`` imports a method's module on first use,
and the module's ``register(...)`` call holds the method itself. A new method is one module and one
line in ``MODULES``."""

from __future__ import annotations

import importlib
import sys
from typing import Any

# method name -> (its module under lsiq.methods, one line for --help), in the order of --help and of
# the tables
MODULES: dict[str, tuple[str, str]] = {
    "gptq": ("gptq", "GPTQ (static activation order, damping 0.01: llm-compressor's defaults)"),
    "lsi": ("lsi", "LWC + LET + learnable singular-value increments (LSI)"),
    "lwc": ("lwc", "OmniQuant's learnable weight clipping"),
    "lwc-let": ("lwc_let", "OmniQuant: LWC plus the learnable equivalent transformation (LET)"),
    "signround": ("signround", "AutoRound's SignRound: learned rounding + clipping, signed gradient descent, best step kept"),
    "lwc-let-round": ("lwc_let_round", "SignRound's rounding + clipping with OmniQuant's LET, mean of the last quarter "
                      "of steps; offsets at 2 / steps at W4+"),
    "oac": ("oac", "GPTQ with output-adaptive Hessians (needs a forward and backward pass of the FP model first)"),
    "rtn": ("rtn", "round to nearest on each group's min/max grid"),
    "sde": ("sde", "LSI + learnable bands beside the singular values' diagonal (--sde-band)"),
}
# The method a user gets without --method, by setting ("w2" ... "w8"; "wa": weight-activation runs;
# "other": any bit width not listed): the best measured (BENCHMARKS.md, "Against the peers").
DEFAULTS: dict[str, str] = {"w2": "lwc-let-round", "w3": "lwc-let-round", "w4": "lwc-let-round",
                            "other": "lwc-let-round", "wa": "lwc-let"}
# the interface, imported (with torch) on first use: lsiq.methods.BlockJob etc.
_LAZY = ("BlockJob", "Calibrated", "Method", "register")


def names() -> list[str]:
    """Every method's name: the table's, then any registered at run time (lsiq.methods.base.register)."""
    base = sys.modules.get("lsiq.methods.base")
    extra = [n for n in base.registered() if n not in MODULES] if base else []
    return list(MODULES) + extra


def get(name: str) -> Any:
    """The registered method called ``name`` (its module imported on first use)."""
    if name in MODULES:
        importlib.import_module(f"lsiq.methods.{MODULES[name][0]}")
    elif "lsiq.methods.base" not in sys.modules:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(names())}")
    from lsiq.methods import base

    return base.get(name)


def summary(name: str) -> str:
    """The method's one line for --help ("" for one registered at run time)."""
    return MODULES[name][1] if name in MODULES else ""


def default_method(wbits: int, abits: int = 16) -> str:
    """The method a user gets without choosing one: the best measured for the setting (BENCHMARKS.md)."""
    key = "wa" if abits < 16 else f"w{wbits}"
    return DEFAULTS.get(key, DEFAULTS["other"])


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from lsiq.methods import base

        return getattr(base, name)
    raise AttributeError(f"module 'lsiq.methods' has no attribute {name!r}")


__all__ = ["MODULES", "DEFAULTS", "summary", "BlockJob", "Calibrated", "Method", "default_method", "get", "names", "register"]
