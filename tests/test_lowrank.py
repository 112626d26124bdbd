"""Low-rank quantization-error reconstruction (QERA, LQER, plain SVD): the closed forms, and the
step that gives a calibrated block's linears their corrections."""

import pytest
import torch

from lsiq.arch import BlockArch
from lsiq.block import calibrate_block
from lsiq.config import CalibConfig
from lsiq.forward import block_forward
from lsiq.lowrank import KINDS, cholesky_root, lowrank_correction, output_error
from lsiq.quantizer import QuantSpec, fake_quant, minmax_scale_zero
from tests.conftest import LINEARS, tiny_llama_config
from tests.test_methods import _block


def _problem(seed=0, inf=64, outf=48, n=512):
    """A 3-bit weight error and inputs with correlated channels of very different scales."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, inf, generator=g) @ torch.randn(inf, inf, generator=g)) * torch.logspace(-1, 1, inf)
    w = torch.randn(outf, inf, generator=g)
    spec = QuantSpec(3, 16)
    err = w - fake_quant(w, *minmax_scale_zero(w, spec), spec)
    return err, x.T @ x / n, x


def test_qera_beats_lqer_and_svd_and_improves_with_rank():
    err, r, _ = _problem()
    base = output_error(err, r)
    last = {k: base for k in KINDS}
    for rank in (2, 4, 8, 16, 32):
        e = {k: output_error(err, r, *lowrank_correction(err, rank, k, r)) for k in KINDS}
        assert e["qera"] < e["lqer"] and e["qera"] < e["svd"], (rank, e)
        for k in KINDS:
            assert e[k] < last[k], (rank, k)  # every method's error falls as the rank grows
        last = e


def test_qera_is_the_optimum_among_rank_r_corrections():
    """No other rank-r correction does better: compare with random perturbations of the QERA factors."""
    err, r, _ = _problem(seed=1, inf=32, outf=24)
    a, b = lowrank_correction(err, 4, "qera", r, damp=0.0)
    best = output_error(err, r, a, b)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        da, db = 1e-2 * torch.randn(a.shape, generator=g), 1e-2 * torch.randn(b.shape, generator=g)
        assert output_error(err, r, a + da, b + db) >= best * (1 - 1e-9)


def test_output_error_is_the_mean_squared_output_error():
    err, r, x = _problem(inf=16, outf=8, n=64)
    a, b = lowrank_correction(err, 3, "qera", r)
    direct = ((x @ (err - a @ b).T) ** 2).sum(-1).mean()
    assert output_error(err, r, a, b) == pytest.approx(direct.item(), rel=1e-4)


def test_singular_autocorrelation_is_handled():
    """Dead input channels and fewer tokens than channels: R is singular; its damped Cholesky factor
    stays finite and invertible, and QERA still beats the input-blind SVD."""
    err, _, x = _problem(inf=64, n=40)  # 40 tokens, 64 channels: rank <= 40
    x[:, :5] = 0  # dead channels
    r = x.T @ x / x.shape[0]
    for dtype in (torch.float64, torch.float32):
        chol = cholesky_root(r, dtype=dtype)
        assert torch.isfinite(chol).all() and bool(chol.diagonal().min() > 0)
        assert torch.allclose((chol @ chol.T).double(), r.double(), atol=1e-4 * r.abs().max().item())
    a, b = lowrank_correction(err, 8, "qera", r)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert b.abs().max() < 1e3 * err.abs().max()
    assert output_error(err, r, a, b) < output_error(err, r, *lowrank_correction(err, 8, "svd"))
    for kind in ("qera", "lqer"):
        a, b = lowrank_correction(err, 8, kind, torch.zeros(64, 64))  # no signal at all: still finite
        assert torch.isfinite(a).all() and torch.isfinite(b).all()
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        lowrank_correction(err, 8, "qera", torch.full((64, 64), float("nan")))


@pytest.mark.parametrize("kind", KINDS)
def test_float32_solves_match_float64(kind):
    """--solve-dtype float32 (a GPU's auto): the same correction quality as float64; and QERA through
    R's Cholesky factor is QERA's closed form through R^{1/2} (formed here from R's eigenvectors)."""
    err, r, _ = _problem(seed=2)
    base = output_error(err, r)
    e64 = output_error(err, r, *lowrank_correction(err, 8, kind, r.double()))
    a, b = lowrank_correction(err, 8, kind, r.float(), dtype=torch.float32)
    assert a.dtype == b.dtype == err.dtype
    assert abs(output_error(err, r, a, b) - e64) < 1e-3 * base, kind
    if kind == "qera":
        r64 = r.double()
        lam, q = torch.linalg.eigh(r64)
        lam = lam.clamp(min=0) + 1e-6 * lam.clamp(min=0).mean()
        u, sv, vh = torch.linalg.svd(err.double() @ (q * lam.sqrt()) @ q.T, full_matrices=False)
        want = (u[:, :8] * sv[:8]) @ vh[:8] @ (q * lam.rsqrt()) @ q.T
        got_a, got_b = lowrank_correction(err.double(), 8, "qera", r64)
        assert torch.allclose(got_a @ got_b, want, rtol=1e-6, atol=1e-8 * want.abs().max().item())


def _calibration_case(n: int):
    """A tiny Llama block, its inputs, kwargs and FP outputs, and its arch: calibrate_block's arguments."""
    cfg = tiny_llama_config()
    _, layer, x, kw = _block(cfg, n=n)
    with torch.no_grad():
        y = block_forward(layer, x, kw)
    return layer, kw, x, y, BlockArch.from_config(cfg)


@pytest.mark.parametrize("method", ["rtn", "lsi"])
def test_block_corrections_lower_the_block_loss(method):
    layer, kw, x, y, arch = _calibration_case(8)
    common = dict(method=method, wbits=3, group_size=32, epochs=2, batch_size=2)
    plain = calibrate_block(layer, kw, x, y, arch, CalibConfig(**common))
    losses = []
    for rank in (2, 8):
        res = calibrate_block(layer, kw, x, y, arch, CalibConfig(lowrank="qera", rank=rank, **common))
        for name in LINEARS:
            q = res.linears[name]
            assert q.lowrank_a.shape == (q.codes.shape[0], rank) and q.lowrank_b.shape == (rank, q.codes.shape[1])
            assert torch.equal(q.lowrank_a, q.lowrank_a.half().float())  # float16 values, as stored
            assert torch.equal(q.codes, plain.linears[name].codes)  # the correction leaves the integer weights
        losses.append(res.loss_after)
    assert losses[0] < plain.loss_after and losses[1] < losses[0]


@pytest.mark.parametrize("kind", ["qera", "lqer", "svd"])
def test_every_kind_corrects_a_block(kind):
    """All three kinds through calibrate_block (svd without building the inputs' autocorrelation)."""
    layer, kw, x, y, arch = _calibration_case(4)
    common = dict(method="rtn", wbits=3, group_size=32, batch_size=2)
    plain = calibrate_block(layer, kw, x, y, arch, CalibConfig(**common))
    res = calibrate_block(layer, kw, x, y, arch, CalibConfig(lowrank=kind, rank=4, **common))
    assert res.loss_after < plain.loss_after
    res32 = calibrate_block(layer, kw, x, y, arch, CalibConfig(lowrank=kind, rank=4, solve_dtype="float32", **common))
    assert res32.loss_after == pytest.approx(res.loss_after, rel=1e-3)  # float32 solves: a GPU's auto


def test_pipeline_stores_and_evaluate_applies_the_corrections(tiny_checkpoint, texts_dir, tmp_path, ray_local):
    import json

    from lsiq.packing import unpack_codes
    from lsiq.quantizer import dequantize
    from pipeline.config import QuantizeConfig
    from pipeline.driver import run
    from pipeline.model_io import MANIFEST, load_quantized

    out = tmp_path / "out"
    calib = CalibConfig(method="rtn", wbits=3, group_size=32, lowrank="qera", rank=4)
    cfg = QuantizeConfig(model=str(tiny_checkpoint), output=str(out), calib=[str(texts_dir / "calib.txt")],
                         calib_cfg=calib, nsamples=4, seqlen=32)
    assert cfg.format == "native"  # the one format that holds corrections
    report = run(cfg, log=lambda m: None)
    arch = BlockArch.from_config(tiny_llama_config())
    per_block = sum(2 * 4 * (o + i) for o, i in arch.linear_shapes().values())  # float16 A [o, 4] and B [4, i]
    assert report["lowrank_bytes"] == 3 * per_block
    assert json.loads((out / MANIFEST).read_text())["quantization"]["lowrank"] == "qera"
    from safetensors.torch import load_file

    t = load_file(out / "model-layers-00001.safetensors")
    p = "model.layers.1.mlp.down_proj"
    assert t[f"{p}.lowrank_a"].dtype == torch.float16 and t[f"{p}.lowrank_b"].shape == (4, arch.intermediate)
    model, _ = load_quantized(str(out))
    spec = QuantSpec(3, 32)
    plain = dequantize(unpack_codes(t[f"{p}.qweight"], 3, arch.intermediate), t[f"{p}.scales"], t[f"{p}.qzeros"].float(), spec)
    want = plain + t[f"{p}.lowrank_a"].float() @ t[f"{p}.lowrank_b"].float()
    assert torch.equal(model.get_submodule(p).weight, want) and not torch.equal(want, plain)
    with pytest.raises(ValueError, match="cannot hold low-rank corrections"):
        run(QuantizeConfig(model=str(tiny_checkpoint), output=str(tmp_path / "bad"), calib=[str(texts_dir / "calib.txt")],
                           calib_cfg=calib, nsamples=4, seqlen=32, format="gptq"), log=lambda m: None)
    assert not (tmp_path / "bad" / MANIFEST).exists()
