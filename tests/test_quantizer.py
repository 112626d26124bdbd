import pytest
import torch

from lsiq.packing import pack_codes, unpack_codes
from lsiq.quantizer import ActQuantizer, QuantSpec, dequantize, fake_quant, minmax_scale_zero, quantize_codes


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group_size", [0, 16])
def test_grid_is_exact(bits, sym, group_size):
    torch.manual_seed(bits)
    spec = QuantSpec(bits, group_size, sym)
    w = torch.randn(8, 64) * torch.rand(8, 1) * 3
    scale, zero = minmax_scale_zero(w, spec)
    codes = quantize_codes(w, scale, zero, spec)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1
    deq = dequantize(codes, scale, zero, spec)
    # every value lies exactly on (k - zero) * scale for an integer k in [0, 2^b - 1]
    g = deq.view(8, spec.groups(64), -1)
    k = g / scale.unsqueeze(-1) + zero.unsqueeze(-1)
    assert torch.allclose(k, k.round(), atol=1e-4)
    assert k.round().min() >= 0 and k.round().max() <= 2**bits - 1
    # fake quantization gives the same values as the integer form
    assert torch.equal(fake_quant(w, scale, zero, spec), deq)
    # round to nearest: inside the representable range the error is at most half a step
    err = (w.view_as(g) - g).abs()
    if not sym:
        # asymmetric min/max: the grid spans each group's range, so every weight is within half a step
        assert (err <= scale.unsqueeze(-1) / 2 + 1e-6).all()
        assert (zero >= 0).all() and (zero <= 2**bits - 1).all()
    else:
        assert (zero == 2 ** (bits - 1)).all()
        # symmetric: +absmax maps to the top code, grid symmetric around zero except the extra negative step
        absmax = w.view_as(g).abs().amax(-1)
        assert torch.allclose(scale, absmax / (2 ** (bits - 1) - 1))


def test_groups_are_independent_at_edges():
    spec = QuantSpec(3, 16)
    w = torch.randn(4, 64)
    s0, z0 = minmax_scale_zero(w, spec)
    w2 = w.clone()
    w2[:, 16:32] *= 100  # change only the second group
    s1, z1 = minmax_scale_zero(w2, spec)
    assert torch.equal(s0[:, [0, 2, 3]], s1[:, [0, 2, 3]])
    assert not torch.equal(s0[:, 1], s1[:, 1])
    d0 = fake_quant(w, s0, z0, spec)
    d1 = fake_quant(w2, s1, z1, spec)
    assert torch.equal(d0[:, :16], d1[:, :16]) and torch.equal(d0[:, 32:], d1[:, 32:])


def test_group_size_must_divide():
    with pytest.raises(ValueError, match="group size 128 does not divide in_features=576"):
        minmax_scale_zero(torch.randn(4, 576), QuantSpec(3, 128))


def test_bad_bits():
    with pytest.raises(ValueError, match="between 2 and 8"):
        QuantSpec(9)
    with pytest.raises(ValueError, match="activation bits"):
        ActQuantizer(5)


def test_straight_through_gradient():
    spec = QuantSpec(3, 16)
    w = torch.randn(4, 32, requires_grad=True)
    s, z = minmax_scale_zero(w.detach(), spec)
    fake_quant(w, s, z, spec).sum().backward()
    # identity gradient wherever the code is not clamped (min/max grid: nothing is clamped)
    assert torch.equal(w.grad, torch.ones_like(w))


def test_act_quantizer_per_token():
    x = torch.randn(2, 5, 32)
    q = ActQuantizer(8)(x)
    assert ((q - x).abs() <= (x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)) / 255 / 2 + 1e-6).all()
    assert torch.equal(ActQuantizer(16)(x), x)
    assert len(torch.unique(ActQuantizer(4)(x)[0, 0])) <= 16


@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_roundtrip(bits):
    codes = torch.randint(0, 2**bits, (3, 100), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (3, (100 * bits + 31) // 32)
    assert torch.equal(unpack_codes(packed, bits, 100), codes)
    # in row chunks (what keeps a 70B linear's int64 temporaries small): the same words
    codes = torch.randint(0, 2**bits, (37, 100), dtype=torch.uint8)
    assert torch.equal(pack_codes(codes, bits, chunk_elems=300), pack_codes(codes, bits, chunk_elems=10**6))
    assert torch.equal(unpack_codes(pack_codes(codes, bits, chunk_elems=300), bits, 100, chunk_elems=300), codes)
    with pytest.raises(ValueError, match="out of range"):
        pack_codes(torch.full((2, 8), 2**bits, dtype=torch.int64), bits)
    with pytest.raises(ValueError, match="1 to 8 are supported"):
        pack_codes(codes, 9)


def _reference_words(row: list[int], bits: int) -> list[int]:
    """The layout, bit by bit: code j's bit i is bit j*b + i of the row's stream, bit k of the stream
    is bit k % 32 of word k // 32 (words read back as signed int32)."""
    words = [0] * ((len(row) * bits + 31) // 32)
    for j, code in enumerate(row):
        for i in range(bits):
            if code >> i & 1:
                k = j * bits + i
                words[k // 32] |= 1 << (k % 32)
    return [w - 2**32 if w >= 2**31 else w for w in words]


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_layout_bit_by_bit(bits):
    """Every width, ragged rows (not a multiple of 32 codes), codes straddling words, the sign bit."""
    g = torch.Generator().manual_seed(bits)
    for in_f in (1, 31, 33, 64, 75):
        codes = torch.randint(0, 2**bits, (3, in_f), dtype=torch.uint8, generator=g)
        codes[0, :] = 2**bits - 1  # all ones: every word's top bit set where the row reaches it
        packed = pack_codes(codes, bits, chunk_elems=in_f)  # one row per chunk
        assert packed.dtype == torch.int32 and packed.is_contiguous()
        assert packed.tolist() == [_reference_words(r, bits) for r in codes.tolist()]
        unpacked = unpack_codes(packed, bits, in_f, chunk_elems=in_f)
        assert unpacked.dtype == torch.uint8 and unpacked.is_contiguous() and torch.equal(unpacked, codes)
    with pytest.raises(ValueError, match="do not hold 75 codes"):
        unpack_codes(packed[:, :-1], bits, 75)


def test_pack_layout_4bit():
    # compressed-tensors pack-quantized: code j in bits [4j, 4j+4) of word j // 8, little-endian
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15]], dtype=torch.uint8)
    word = pack_codes(codes, 4)[0, 0].item() & 0xFFFFFFFF
    assert word == 0xF7654321


def test_round_ste_is_the_detach_form_bit_for_bit():
    """round_ste's one kernel gives what (x.round() - x).detach() + x gives, values and gradients,
    halves (ties to even), tiny and huge values included."""
    from lsiq.quantizer import round_ste

    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(10_000, generator=g) * s for s in (0.3, 3.0, 300.0, 3e7)]
                  + [torch.arange(-20, 20) + 0.5, torch.tensor([0.0, -0.0, 1e-30, -1e-30, 2.0**24 + 2])])
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = round_ste(a), (b.round() - b).detach() + b
    assert torch.equal(ya, yb) and torch.equal(ya, x.round())
    w = torch.randn(x.shape, generator=g)
    (ya * w).sum().backward()
    (yb * w).sum().backward()
    assert torch.equal(a.grad, b.grad) and torch.equal(a.grad, w)


@pytest.mark.parametrize("bits,group_size,offsets", [(2, 64, True), (4, 32, False), (3, 0, True)])
def test_fake_quant_backward_is_autograds(bits, group_size, offsets):
    """fake_quant's hand-written backward gives autograd's gradients of the op-by-op formula (to
    float64 rounding) for the weight, the clipping factors behind the grid and the rounding
    offsets, clamped codes included; the forward is the same bit for bit."""
    from lsiq.quantizer import grouped, round_ste, scale_zero_from_range

    def op_by_op(w, scale, zero, spec, offset=None):
        g, s, z = grouped(w, spec), scale.unsqueeze(-1), zero.unsqueeze(-1)
        x = g / s if offset is None else g / s + grouped(offset, spec)
        return (((round_ste(x) + z).clamp(0, spec.qmax) - z) * s).reshape(w.shape)

    spec = QuantSpec(bits, group_size)
    gen = torch.Generator().manual_seed(bits)
    w0 = torch.randn(24, 128, generator=gen, dtype=torch.float64)
    v0 = torch.rand(24, 128, generator=gen, dtype=torch.float64) - 0.5
    dy = torch.randn(24, 128, generator=gen, dtype=torch.float64)
    grads = []
    for f in (op_by_op, fake_quant):
        w = w0.clone().requires_grad_()
        # factors below 1 clip the range: some codes clamp, so every branch of the backward runs
        lo, hi = (torch.full((24, spec.groups(128)), c, dtype=torch.float64, requires_grad=True) for c in (0.8, 0.7))
        v = v0.clone().requires_grad_() if offsets else None
        g = grouped(w, spec)
        s, z = scale_zero_from_range(lo * g.amin(-1), hi * g.amax(-1), spec, ste=True)
        y = f(w, s, z, spec, v)
        (y * dy).sum().backward()
        grads.append([y.detach(), w.grad, lo.grad, hi.grad] + ([v.grad] if offsets else []))
    ref, got = grads
    assert torch.equal(ref[0], got[0])
    assert (ref[1] == 0).any()  # some codes were clamped
    for a, b in zip(ref[1:], got[1:], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
