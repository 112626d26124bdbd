"""The run report: a JSON file of what happened and a PNG plot of per-block loss: its value before
and after calibration, and the reduction that calibration gave each block, in percent."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_report(path: str, report: dict[str, Any]) -> str:
    """Write ``report`` as JSON to ``path`` and the loss plot beside it; returns the PNG path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(report, indent=2) + "\n")
    png = p.with_suffix(".png")
    plot_losses(report, str(png))
    return str(png)


def plot_losses(report: dict[str, Any], png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = report["blocks"]
    idx = [b["index"] for b in blocks]
    before = [b["loss_before"] for b in blocks]
    after = [b["loss_after"] for b in blocks]
    # the gain per block, relative to round to nearest: what a log axis over several decades hides
    gain = [100.0 * (b - a) / b if b > 0 else 0.0 for b, a in zip(before, after, strict=True)]
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    ax.plot(idx, before, "o-", ms=3, label="round to nearest")
    ax.plot(idx, after, "s-", ms=3, label=f"after {report['config']['method']}")
    ax.set_yscale("log")
    ax.set_ylabel("block output MSE\n(calibration set, log scale)")
    q = report["config"]
    mean = sum(gain) / len(gain) if gain else 0.0
    ax.set_title(f"{Path(report['model']).name}: {q['method']} W{q['wbits']}A{q['abits']} g{q['group_size']}, "
                 f"{q['nsamples']} x {q['seqlen']} tokens; mean reduction {mean:.1f} %")
    ax.grid(True, alpha=0.3)
    ax.legend()
    bx.bar(idx, gain, color=["tab:green" if g >= 0 else "tab:red" for g in gain])
    bx.axhline(0.0, color="black", lw=0.8)
    bx.set_ylabel("MSE reduction against\nround to nearest (%)")
    bx.set_xlabel("block")
    bx.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
