"""Command-line flags generated from the config dataclasses' fields, so every command that takes a
setting (quantize, plan, schedule's RUN.yaml) offers it with the same name, default and help.

A field's metadata (lsiq.config.opt) holds its help, group and choices; ``cli=False`` hides it.
Booleans that default to False become switches (``--sym``); those that default to None (the
method's default) get ``--x/--no-x``. A default of None prints as "the method's default".
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from typing import Any

from lsiq.config import GROUPS, CalibConfig


class BadInput(SystemExit):
    """Exit status 2 with one ``error:`` line on stderr: bad input, found before any state is written
    (exit status 1 is a run that failed)."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message
        print(f"error: {message}", file=sys.stderr, flush=True)

    def __str__(self) -> str:
        return f"error: {self.message}"


def flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _kind(hint: Any) -> type:
    """The scalar type of a field's annotation (int | None -> int)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def add_config_args(parser: argparse.ArgumentParser, cls: type = CalibConfig, groups: tuple[str, ...] = GROUPS,
                    skip: tuple[str, ...] = (), choices: dict[str, list[str]] | None = None,
                    titles: dict[str, str] | None = None) -> dict[str, argparse._ArgumentGroup]:
    """Add one flag per CLI field of ``cls`` in ``groups`` (argparse groups by title); returns the groups.
    ``choices`` overrides a field's choices (e.g. the registered method names)."""
    hints = typing.get_type_hints(cls)
    made: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        group = meta.get("group", "method")
        if not meta.get("cli", True) or f.name in skip or group not in groups:
            continue
        if group not in made:
            made[group] = parser.add_argument_group((titles or {}).get(group, group))
        g = made[group]
        kind = _kind(hints[f.name])
        default = f.default
        text = meta.get("help", "")
        opts = (choices or {}).get(f.name, meta.get("choices"))
        if kind is bool:
            if default is None:
                g.add_argument(flag(f), dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                               help=f"{text} (default: the method's)")
            else:
                g.add_argument(flag(f), dest=f.name, action="store_true", help=text)
            continue
        shown = "the method's" if default is None else default
        g.add_argument(flag(f), dest=f.name, type=kind, default=default, choices=opts,
                       metavar=None if opts else f.name.upper(),
                       help=text if "default" in text else f"{text} (default: {shown})")
    return made


def config_from_args(a: argparse.Namespace, cls: type = CalibConfig, **fixed: Any) -> Any:
    """Build ``cls`` from the parsed flags (the fields that have one) and ``fixed`` values."""
    kw = {f.name: getattr(a, f.name) for f in dataclasses.fields(cls) if hasattr(a, f.name)}
    return cls(**(kw | fixed))


def add_budget_args(group: argparse._ArgumentGroup, nsamples: int, seqlen: int) -> None:
    """--nsamples and --seqlen, for every command that takes a calibration budget (one help, one default)."""
    group.add_argument("--nsamples", type=int, default=nsamples, help="calibration sequences (default: %(default)s)")
    group.add_argument("--seqlen", type=int, default=seqlen, help="tokens per calibration sequence (default: %(default)s)")


def per_worker_batch(cfg: CalibConfig, asked: int | None, workers: int) -> CalibConfig:
    """Without --batch-size, N > 1 data-parallel workers take at least one sample each per step: a
    smaller global batch would leave workers idle at every step while they still all-reduce."""
    if asked is None and workers > 1 and cfg.batch_size < workers:
        return dataclasses.replace(cfg, batch_size=workers)
    return cfg
