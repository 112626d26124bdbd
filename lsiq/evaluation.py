"""Perplexity of a causal LM on token windows, the one definition every benchmark here uses.

exp(mean next-token cross-entropy over every predicted position of every window): each window
of L tokens predicts its L - 1 last tokens. Only torch is needed, so the same function scores
other tools' models in their own environments (scripts/bench_peers.py).
"""

from __future__ import annotations

import math
import sys
import time

import torch


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 1, progress: bool = False) -> float:
    """exp of the mean next-token cross-entropy over every predicted position of every window."""
    total, count = 0.0, 0
    t0 = time.perf_counter()
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i:i + batch_size]
        logits = model(input_ids=ids, use_cache=False).logits.float()
        total += torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
        count += ids[:, 1:].numel()
        if progress:
            done = min(i + batch_size, windows.shape[0])
            eta = (time.perf_counter() - t0) / done * (windows.shape[0] - done)
            print(f"\reval {done}/{windows.shape[0]} windows  ppl so far {math.exp(total / count):.3f}  "
                  f"ETA {eta:.0f}s", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return math.exp(total / count)
