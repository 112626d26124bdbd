"""Token data: seeded calibration windows and the perplexity evaluation windows."""

from __future__ import annotations

import random
from pathlib import Path

import torch


def _read_documents(files: list[str]) -> list[str]:
    for f in files:
        if not Path(f).is_file():
            raise FileNotFoundError(f"text file not found: {f}")
    from datasets import load_dataset  # here: its import costs every process that imports this module ~0.7 s

    ds = load_dataset("text", data_files=list(files), sample_by="document", split="train", keep_in_memory=True)
    return [t for t in ds["text"] if t]


def calibration_ids(tokenizer, files: list[str], nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` tokens, each from a random place of the calibration text.

    A random document (weighted by length) and character offset are drawn, a span of characters
    is tokenized (no special tokens) and its first ``seqlen`` tokens kept. Seeded: same seed, same ids.
    """
    docs = _read_documents(files)
    if not docs:
        raise ValueError(f"calibration text {', '.join(map(str, files))} is empty")
    rng = random.Random(seed)
    lengths = [len(d) for d in docs]
    span = seqlen * 12  # characters; comfortably more than seqlen tokens for natural text
    out = []
    for _ in range(nsamples):
        for _attempt in range(20):
            d = docs[rng.choices(range(len(docs)), weights=lengths)[0]]
            start = rng.randrange(max(1, len(d) - span))
            ids = tokenizer(d[start:start + span], add_special_tokens=False)["input_ids"]
            if len(ids) >= seqlen:
                out.append(ids[:seqlen])
                break
        else:
            raise ValueError(f"calibration text {files} is too short for {seqlen}-token samples")
    return torch.tensor(out, dtype=torch.long)


def eval_windows(tokenizer, files: list[str], seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Perplexity windows: each file's whole text tokenized without special tokens, concatenated,
    cut into consecutive non-overlapping ``seqlen``-token windows (remainder dropped), first K kept."""
    ids: list[int] = []
    for f in files:
        ids.extend(tokenizer(Path(f).read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"])
    n = len(ids) // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"{files}: fewer than {seqlen} tokens")
    return torch.tensor(ids[: n * seqlen], dtype=torch.long).view(n, seqlen)
