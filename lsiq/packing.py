"""Bit packing of b-bit codes into int32 words: a little-endian bitstream along each row.

Row r's code j occupies bits [j*b, (j+1)*b) of the row's stream; bit k of the stream is bit k % 32
of word k // 32. For b = 4 and 8 this is compressed-tensors' pack-quantized layout; 3-bit codes may
straddle two words.

How: 32 consecutive codes fill exactly b words (32 b bits), so a row is cut into groups of 32 codes
(the last one padded with zero codes, which add only zero bits). Code j of every group has the same
word and bit offset, so after one transpose to [32, rows, groups] each of the 32 positions is one
contiguous shift-and-OR over all groups at once, in int32 (no per-code index tensors, no int64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GROUP = 32  # codes per group: 32 codes of b bits fill b words exactly


def packed_words(in_features: int, bits: int) -> int:
    return (in_features * bits + 31) // 32


def _fields(bits: int) -> list[tuple[int, int, bool]]:
    """For code j of a group: (word its low bits go to, their bit offset, whether its top bits
    spill into the next word)."""
    return [(j * bits // 32, j * bits % 32, j * bits % 32 + bits > 32) for j in range(GROUP)]


def _row_chunks(rows: int, row_elems: int, chunk_elems: int) -> list[slice]:
    """Row slices of about ``chunk_elems`` elements; one empty slice for no rows (torch.cat needs one)."""
    step = max(1, chunk_elems // max(row_elems, 1))
    return [slice(r, r + step) for r in range(0, rows, step)] or [slice(0, 0)]


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"codes of {bits} bits: 1 to 8 are supported")


def pack_codes(codes: torch.Tensor, bits: int, chunk_elems: int = 2**25) -> torch.Tensor:
    """Pack uint8 codes [out, in] into int32 [out, ceil(in * bits / 32)], on the codes' device,
    through the rows in chunks of about ``chunk_elems`` codes (bounded temporaries)."""
    _check_bits(bits)
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D, got shape {tuple(codes.shape)}")
    out_f, in_f = codes.shape
    if codes.numel() and (int(codes.max()) >= 2**bits or int(codes.min()) < 0):
        raise ValueError(f"codes out of range for {bits} bits")
    # cat also makes the result contiguous (the chunks of a ragged row width are slices), as safetensors needs
    return torch.cat([_pack_rows(codes[rows], bits) for rows in _row_chunks(out_f, in_f, chunk_elems)])


def _pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`pack_codes` on rows already checked to be in range."""
    rows, in_f = codes.shape
    groups = -(-in_f // GROUP)
    c = F.pad(codes.to(torch.uint8), (0, groups * GROUP - in_f)).view(rows, groups, GROUP).permute(2, 0, 1).contiguous()
    words = torch.zeros(bits, rows, groups, dtype=torch.int32, device=codes.device)
    for j, (w, off, spills) in enumerate(_fields(bits)):
        cj = c[j].to(torch.int32)
        words[w] |= cj << off  # int32 shifts wrap: a field reaching bit 31 sets the sign bit, as stored
        if spills:
            words[w + 1] |= cj >> (32 - off)
    return words.permute(1, 2, 0).reshape(rows, groups * bits)[:, :packed_words(in_f, bits)]


def unpack_codes(packed: torch.Tensor, bits: int, in_features: int, chunk_elems: int = 2**25) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int32 [out, words] to uint8 [out, in_features], through the
    rows in chunks of about ``chunk_elems`` codes."""
    _check_bits(bits)
    if packed.dim() != 2 or packed.shape[1] != packed_words(in_features, bits):
        raise ValueError(f"packed words of shape {tuple(packed.shape)} do not hold {in_features} codes of {bits} bits "
                         f"per row ({packed_words(in_features, bits)} words)")
    return torch.cat([_unpack_rows(packed[rows], bits, in_features)
                      for rows in _row_chunks(packed.shape[0], in_features, chunk_elems)])


def _unpack_rows(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """:func:`unpack_codes` on one chunk of rows."""
    rows = packed.shape[0]
    groups = -(-in_features // GROUP)
    w = F.pad(packed.to(torch.int32), (0, groups * bits - packed.shape[1])).view(rows, groups, bits)
    w = w.permute(2, 0, 1).contiguous()
    codes = torch.empty(GROUP, rows, groups, dtype=torch.uint8, device=packed.device)
    for j, (wi, off, spills) in enumerate(_fields(bits)):
        v = w[wi] >> off  # arithmetic shift: the sign-extended top bits are masked off below
        if spills:
            v = (v & ((1 << (32 - off)) - 1)) | (w[wi + 1] << (32 - off))
        codes[j] = v & (2**bits - 1)
    return codes.permute(1, 2, 0).reshape(rows, groups * GROUP)[:, :in_features]
