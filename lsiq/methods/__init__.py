"""The calibration methods, one module each, behind one interface (lsiq.methods.base.Method) and
one registry. ``get(name)`` returns a method, ``names()`` lists them in registration order,
``default_method(wbits, abits)`` is what a user gets without choosing."""

# Importing a method's module registers it; the order is the order of --help and of the tables.
from lsiq.methods import gptq, lsi, lwc, lwc_let, lwc_let_round, oac, rtn, sde, signround  # noqa: E402, F401, I001
from lsiq.methods.base import BlockJob, Calibrated, Method, default_method, get, names, register

__all__ = ["BlockJob", "Calibrated", "Method", "default_method", "get", "names", "register"]
