"""Bit packing of b-bit codes into int32 words: a little-endian bitstream along each row.

Row r's code j occupies bits [j*b, (j+1)*b) of the row's stream; bit k of the stream is bit k % 32
of word k // 32. For b = 4 and 8 this is compressed-tensors' pack-quantized layout; 3-bit codes may
straddle two words.
"""

from __future__ import annotations

import torch


def packed_words(in_features: int, bits: int) -> int:
    return (in_features * bits + 31) // 32


def pack_codes(codes: torch.Tensor, bits: int, chunk_elems: int = 2**25) -> torch.Tensor:
    """Pack uint8 codes [out, in] into int32 [out, ceil(in * bits / 32)], on the codes' device.
    Works through the rows in chunks of about ``chunk_elems`` codes, so its int64 temporaries
    stay small (unchunked, a 70B MLP linear's would be ~1.9 GB each)."""
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D, got shape {tuple(codes.shape)}")
    out_f, in_f = codes.shape
    if codes.numel() and (int(codes.max()) >= 2**bits or int(codes.min()) < 0):
        raise ValueError(f"codes out of range for {bits} bits")
    rows = max(1, chunk_elems // max(in_f, 1))
    if out_f > rows:
        return torch.cat([_pack_rows(codes[r:r + rows], bits) for r in range(0, out_f, rows)])
    return _pack_rows(codes, bits)


def _pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`pack_codes` on rows already checked to be in range."""
    out_f, in_f = codes.shape
    c = codes.to(torch.int64)
    pos = torch.arange(in_f, dtype=torch.int64, device=codes.device) * bits
    word, off = pos // 32, pos % 32
    words = torch.zeros(out_f, packed_words(in_f, bits) + 1, dtype=torch.int64, device=codes.device)
    # Low part goes into `word`, the bits that overflow 32 go into `word + 1`. Bits never overlap, so
    # adding is the same as OR-ing.
    low = (c << off) & 0xFFFFFFFF
    high = c >> (32 - off)
    words.scatter_add_(1, word.expand(out_f, -1), low)
    words.scatter_add_(1, (word + 1).expand(out_f, -1), torch.where(off + bits > 32, high, torch.zeros_like(high)))
    words = words[:, :-1]
    # Reinterpret as signed int32 two's complement.
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_codes(packed: torch.Tensor, bits: int, in_features: int, chunk_elems: int = 2**25) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int32 [out, words] to uint8 [out, in_features]. Works through
    the rows in chunks of about ``chunk_elems`` codes, so its int64 temporaries stay small."""
    rows = max(1, chunk_elems // max(in_features, 1))
    if packed.shape[0] > rows:
        return torch.cat([unpack_codes(packed[r:r + rows], bits, in_features, chunk_elems)
                          for r in range(0, packed.shape[0], rows)])
    w = packed.to(torch.int64) & 0xFFFFFFFF
    w = torch.cat([w, torch.zeros_like(w[:, :1])], dim=1)
    pos = torch.arange(in_features, dtype=torch.int64, device=packed.device) * bits
    word, off = pos // 32, pos % 32
    lo = w[:, word] >> off
    hi = w[:, word + 1] << (32 - off)
    mask = 2**bits - 1
    return ((lo | torch.where(off + bits > 32, hi, torch.zeros_like(hi))) & mask).to(torch.uint8)
