"""The run report: a JSON file of what happened and a PNG plot of per-block loss."""

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
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(idx, [b["loss_before"] for b in blocks], "o-", label="before (round to nearest)")
    ax.plot(idx, [b["loss_after"] for b in blocks], "s-", label=f"after ({report['config']['method']})")
    ax.set_yscale("log")
    ax.set_xlabel("block")
    ax.set_ylabel("block output MSE (calibration set)")
    q = report["config"]
    ax.set_title(f"{Path(report['model']).name}: {q['method']} W{q['wbits']}A{q['abits']} g{q['group_size']}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
