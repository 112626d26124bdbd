"""The run report: a JSON file of what happened and a PNG plot of each block's output error before
and after calibration (per-token relative error, lsiq.forward.output_errors) and the reduction that
calibration gave each block, in percent."""

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
    # the per-token relative error: the block-output MSE is dominated by a few massive-activation
    # positions, whose error hardly moves perplexity, and would hide what calibration did elsewhere
    before = [100.0 * b["rel_before"] for b in blocks]
    after = [100.0 * b["rel_after"] for b in blocks]
    # the gain per block, relative to round to nearest: what a log axis over several decades hides
    gain = [100.0 * (b - a) / b if b > 0 else 0.0 for b, a in zip(before, after, strict=True)]
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    ax.plot(idx, before, "o-", ms=3, label="round to nearest")
    ax.plot(idx, after, "s-", ms=3, label=f"after {report['config']['method']}")
    low, high = min([*before, *after], default=1.0), max([*before, *after], default=1.0)
    scale = "log" if low > 0 and high / low > 20 else "linear"  # a log axis only where the range needs it
    ax.set_yscale(scale)
    if scale == "log":
        from matplotlib.ticker import FuncFormatter

        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    else:
        ax.set_ylim(bottom=0)
    where = "per token, calibration set" + (", log scale" if scale == "log" else "")
    ax.set_ylabel(f"block output error, % of the FP output\n({where})")
    q = report["config"]
    mean = sum(gain) / len(gain) if gain else 0.0
    ppl = report.get("perplexity")
    ppl_text = f"\nperplexity on {ppl['text']}: {ppl['before']:.2f} (FP) -> {ppl['after']:.2f} (quantized)" if ppl else ""
    ax.set_title(f"{Path(report['model']).name}: {q['method']} W{q['wbits']}A{q['abits']} g{q['group_size']}, "
                 f"{q['nsamples']} x {q['seqlen']} tokens; mean reduction {mean:.1f} %{ppl_text}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    bx.bar(idx, gain, color=["tab:green" if g >= 0 else "tab:red" for g in gain])
    bx.axhline(0.0, color="black", lw=0.8)
    bx.set_ylabel("error reduction against\nround to nearest (%)")
    bx.set_xlabel("block")
    bx.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def add_perplexity(path: str, text: str, before: float, after: float) -> str:
    """Record the perplexity of the source and of the quantized model on ``text`` in the report at
    ``path`` and redraw its plot (the run itself never loads a whole model to measure it)."""
    p = Path(path)
    report = json.loads(p.read_text())
    report["perplexity"] = {"text": text, "before": before, "after": after}
    return write_report(path, report)
