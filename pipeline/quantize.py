"""python -m pipeline.quantize: quantize a checkpoint block by block through a Ray DAG.

Data flows one way: reader actor -> calibrator actor -> writer actor -> manifest (see
:mod:`pipeline.dag`). The reader fetches block i+1 while block i calibrates and the writer stores
block i-1; the model is never loaded whole, by the driver or any actor (one block at a time, plus
the embeddings and head in the driver during setup). The manifest, written last, marks the
output complete; per-block checkpoint records let a rerun resume.

This module is the command line: it parses the flags before importing torch, transformers or Ray
(so ``--help`` is quick), then runs :func:`pipeline.driver.run`. Exit status: 0 done; 2 an input
or output that cannot be used (one ``error:`` line; found before anything is written where it can
be); 1 a run that failed on its way (storage still failing after its retries, a full disk, the
calibrator dying again and again: one ``error:`` line, the finished blocks are kept and the same
command resumes; an unexpected bug keeps its traceback); 130 interrupted (Ctrl-C or SIGTERM: one
line, the finished blocks are kept and the same command resumes).
"""

from __future__ import annotations

import signal
import sys
from typing import Any

from pipeline.config import QuantizeConfig, parse_quantize_args

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 1, 2, 130


def _stop(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM stops a run the way Ctrl-C does


def _blocks_saved(cfg: QuantizeConfig) -> int:
    """How many finished-block records the output holds (what a rerun resumes from)."""
    from pipeline.resume import is_block_record
    from pipeline.writer import OutputDir

    try:
        return sum(1 for f in OutputDir(cfg.output, cfg.out_storage_options).listing() if is_block_record(f))
    except Exception:  # noqa: BLE001 - the count is a courtesy; the interruption is what is reported
        return 0


def main(argv: list[str] | None = None) -> int:
    cfg = parse_quantize_args(argv)
    # a parent process can hand us SIGINT blocked or ignored (both are inherited across exec; pytest's
    # session Ray did), and Ctrl-C would then never arrive: take both back
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _stop)
    from pipeline.driver import cause, run
    from pipeline.storage import PERMANENT

    try:
        run(cfg)
    except KeyboardInterrupt:
        n = _blocks_saved(cfg)
        print(f"interrupted after {n} finished block(s), kept in {cfg.output}; rerun the same command to resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        why = cause(e)
        # ValueError covers CheckpointError, UnsupportedArchitecture and ResumeMismatch; the permanent
        # storage errors name a path the user must change (the other OSErrors failed on the way)
        if isinstance(why, (ValueError, *PERMANENT)):
            print(f"error: {why}", file=sys.stderr)
            return EXIT_BAD_INPUT
        if isinstance(why, OSError | RuntimeError):
            n = _blocks_saved(cfg)
            print(f"error: {why} (run failed after {n} finished block(s), kept in {cfg.output}; "
                  "rerun the same command to resume)", file=sys.stderr)
            return EXIT_FAILED
        raise
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
