"""Packing a whole block's codes into int32 words, and back: this implementation against the one
before it (one index per code through scatter_add / gather in int64), in one run.

    python scripts/bench_packing.py                    # Llama-2-70B block shapes, 4 and 3 bits; bench_out/packing
    python scripts/bench_packing.py --model-config clusters/models/llama-3-8b --bits 4 --device cuda

Every block's codes are packed once for storage and unpacked once to feed the next block the stored
weights (and again by a resumed run's replay and by the evaluator). Random codes with the block's
linear shapes; seconds are the median of --reps after a warm-up; the words and the codes read back
must equal the old implementation's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_gpu import timed  # noqa: E402  - median of repeats after a warm-up, synchronised on a GPU

from lsiq.packing import pack_codes, packed_words, unpack_codes  # noqa: E402
from pipeline.plan import load_arch  # noqa: E402


def scatter_pack(codes: torch.Tensor, bits: int, chunk_elems: int = 2**25) -> torch.Tensor:
    """The implementation before this one (as of commit 19084b3): an int64 bit position per code,
    scatter_add into the words."""
    out_f, in_f = codes.shape
    rows = max(1, chunk_elems // max(in_f, 1))
    if out_f > rows:
        return torch.cat([scatter_pack(codes[r:r + rows], bits, chunk_elems) for r in range(0, out_f, rows)])
    c = codes.to(torch.int64)
    pos = torch.arange(in_f, dtype=torch.int64, device=codes.device) * bits
    word, off = pos // 32, pos % 32
    words = torch.zeros(out_f, packed_words(in_f, bits) + 1, dtype=torch.int64, device=codes.device)
    words.scatter_add_(1, word.expand(out_f, -1), (c << off) & 0xFFFFFFFF)
    words.scatter_add_(1, (word + 1).expand(out_f, -1), torch.where(off + bits > 32, c >> (32 - off), 0))
    words = words[:, :-1]
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def gather_unpack(packed: torch.Tensor, bits: int, in_features: int, chunk_elems: int = 2**25) -> torch.Tensor:
    """The unpacking before this one (as of commit 19084b3): an int64 gather of each code's words."""
    rows = max(1, chunk_elems // max(in_features, 1))
    if packed.shape[0] > rows:
        return torch.cat([gather_unpack(packed[r:r + rows], bits, in_features, chunk_elems)
                          for r in range(0, packed.shape[0], rows)])
    w = packed.to(torch.int64) & 0xFFFFFFFF
    w = torch.cat([w, torch.zeros_like(w[:, :1])], dim=1)
    pos = torch.arange(in_features, dtype=torch.int64, device=packed.device) * bits
    word, off = pos // 32, pos % 32
    lo, hi = w[:, word] >> off, w[:, word + 1] << (32 - off)
    return ((lo | torch.where(off + bits > 32, hi, 0)) & (2**bits - 1)).to(torch.uint8)


def timings(bits: int, codes: list[torch.Tensor], words: list[torch.Tensor], device: torch.device,
            reps: int) -> dict[str, float]:
    """Seconds to pack the block's codes and to unpack its words, before and now."""
    runs = {"pack_before": lambda: [scatter_pack(c, bits) for c in codes],
            "pack": lambda: [pack_codes(c, bits) for c in codes],
            "unpack_before": lambda: [gather_unpack(w, bits, c.shape[1]) for w, c in zip(words, codes, strict=True)],
            "unpack": lambda: [unpack_codes(w, bits, c.shape[1]) for w, c in zip(words, codes, strict=True)]}
    return {f"{name}_s": timed(fn, device, reps) for name, fn in runs.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-config", default=str(ROOT / "clusters/models/llama-2-70b"))
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    p.add_argument("--device", default="cpu")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default="bench_out/packing")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    shapes = load_arch(args.model_config).linear_shapes()
    results = []
    for bits in args.bits:
        g = torch.Generator(device=device).manual_seed(bits)
        codes = [torch.randint(0, 2**bits, s, dtype=torch.uint8, generator=g, device=device) for s in shapes.values()]
        new_words, old_words = [pack_codes(c, bits) for c in codes], [scatter_pack(c, bits) for c in codes]
        assert all(torch.equal(a, b) for a, b in zip(new_words, old_words, strict=True)), "packed words differ"
        assert all(torch.equal(unpack_codes(w, bits, c.shape[1]), c) for w, c in zip(new_words, codes, strict=True))
        assert all(torch.equal(gather_unpack(w, bits, c.shape[1]), c) for w, c in zip(new_words, codes, strict=True))
        row = {"bits": bits, "codes": sum(c.numel() for c in codes), **timings(bits, codes, new_words, device, args.reps)}
        row["pack_speedup"] = row["pack_before_s"] / row["pack_s"]
        row["unpack_speedup"] = row["unpack_before_s"] / row["unpack_s"]
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        results.append(row)
        del codes, new_words, old_words
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"model_config": args.model_config, "device": str(device), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "results": results}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
