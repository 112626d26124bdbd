"""Learned rounding (SignRound) and what comes with it: signed gradient descent, linear learning-rate
decay, keeping the best step, GPTQ as the starting point, and static activation order in GPTQ."""

import pytest
import torch

from lsiq import methods
from lsiq.arch import BlockArch
from lsiq.block import calibrate_block
from lsiq.config import CalibConfig
from lsiq.forward import block_forward
from lsiq.gptq import HessianAccumulator, gptq_quantize
from lsiq.optim import SignSGD
from lsiq.quantizer import QuantSpec, fake_quant, minmax_scale_zero, quantize_codes
from lsiq.rounding import RoundingOffsets
from lsiq.trainable import BlockQuantizer, trainable_count
from tests.conftest import LINEARS, tiny_llama_config
from tests.test_methods import _block


def _calibrated(cfg_over: dict, n: int = 8):
    cfg = tiny_llama_config()
    _, layer, x, kw = _block(cfg, n=n)
    with torch.no_grad():
        y = block_forward(layer, x, kw)
    arch = BlockArch.from_config(cfg)
    ccfg = CalibConfig(**{"wbits": 2, "group_size": 32, **cfg_over})
    return calibrate_block(layer, kw, x, y, arch, ccfg), layer, x, kw, y, arch


def test_signsgd_moves_every_parameter_by_its_learning_rate():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0, 0.5]))
    opt = SignSGD([p], lr=0.25)
    p.grad = torch.tensor([3.0, -0.001, 0.0, -7.0])
    opt.step()
    assert torch.equal(p.detach(), torch.tensor([0.75, -1.75, 3.0, 0.75]))


def test_offsets_choose_the_rounding_direction_within_one_step():
    spec = QuantSpec(3, 4)
    torch.manual_seed(0)
    w = torch.randn(8, 16)
    scale, zero = minmax_scale_zero(w, spec)
    rtn = quantize_codes(w, scale, zero, spec)
    off = RoundingOffsets(w.shape)
    assert torch.equal(quantize_codes(w, scale, zero, spec, off()), rtn)  # zero offsets: round to nearest
    off.delta.data.fill_(0.49999)
    codes = quantize_codes(w, scale, zero, spec, off())
    assert ((codes.int() - rtn.int()).abs() <= 1).all()  # at most one step away, up
    assert (codes.int() >= rtn.int()).all()
    off.delta.data.fill_(3.0)
    off.project()  # offsets stay in [-0.5, 0.5]
    assert off.delta.max().item() == 0.5
    # the fake quantizer computes the weights of the codes, with a straight-through gradient
    off.delta.data.uniform_(-0.5, 0.5)
    fq = fake_quant(w, scale, zero, spec, off())
    codes = quantize_codes(w, scale, zero, spec, off())
    g = codes.float().view(8, 4, 4)
    torch.testing.assert_close(fq, ((g - zero[..., None]) * scale[..., None]).view(8, 16))
    fq.sum().backward()
    assert off.delta.grad is not None and off.delta.grad.abs().sum() > 0


def test_static_actorder_gptq_beats_the_original_order_and_keeps_the_fp_grid():
    """Columns with large Hessian diagonals first: a lower output error than the original column
    order on inputs whose channels differ in scale, with each group's grid the FP weight's."""
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    x = torch.randn(4096, 256) * torch.linspace(0.1, 3.0, 256)[torch.randperm(256)]
    acc = HessianAccumulator(256)
    acc.add(x)
    spec = QuantSpec(3, 64)
    err = {}
    for order in ("none", "static"):
        q, scale, zero = gptq_quantize(w, acc.h, spec, actorder=order)
        err[order] = ((x @ (q - w).T) ** 2).mean().item()
    s, z = minmax_scale_zero(w, spec)
    torch.testing.assert_close(scale, s)
    assert torch.equal(zero, z)
    assert err["static"] < err["none"]
    with pytest.raises(ValueError, match="actorder"):
        gptq_quantize(w, acc.h, spec, actorder="group")


def test_signround_lowers_the_loss_and_keeps_the_best_step():
    res, *_ = _calibrated({"method": "signround", "steps": 12})
    assert len(res.losses) == 12
    assert res.loss_after < res.loss_before
    # the first step's loss is measured before any update: round to nearest's on that batch
    assert min(res.losses) <= res.losses[0]


def test_keep_best_ends_on_the_best_steps_parameters():
    """With keep_best the block ends with the parameters that gave the lowest training-batch loss,
    which on one batch (batch = all samples) is exactly the reported loss after calibration."""
    res, *_ = _calibrated({"method": "signround", "steps": 10, "batch_size": 8, "lr_round": 0.3}, n=8)
    assert res.loss_after == pytest.approx(min(res.losses), rel=1e-5)
    no_best, *_ = _calibrated({"method": "signround", "steps": 10, "batch_size": 8, "lr_round": 0.3,
                               "keep_best": False}, n=8)
    assert no_best.losses == res.losses  # the same steps; only the parameters kept at the end differ


def test_average_tail_ends_on_the_mean_of_the_last_steps(monkeypatch):
    """With average_tail the block ends with the mean of the parameters after each of the last
    steps (here the last 3 of 6), not with the last or the best step's."""
    seen: list[list[torch.Tensor]] = []
    project = BlockQuantizer.project

    def recording_project(self):
        project(self)
        seen.append([p.detach().clone() for p in self.parameters() if p.requires_grad])

    monkeypatch.setattr(BlockQuantizer, "project", recording_project)
    finals: list[list[torch.Tensor]] = []
    finalize = BlockQuantizer.finalize
    monkeypatch.setattr(BlockQuantizer, "finalize",
                        lambda self: (finals.append([p.detach().clone() for p in self.parameters() if p.requires_grad]),
                                      finalize(self))[1])
    res, *_ = _calibrated({"method": "lwc-let-round", "steps": 6, "average_tail": 0.5, "lr_round": 0.3}, n=4)
    assert len(seen) == 6 and len(finals) == 1
    for got, *tail in zip(finals[0], *seen[3:], strict=True):
        torch.testing.assert_close(got, torch.stack(tail).mean(0))
    assert any(not torch.equal(a, b) for a, b in zip(finals[0], seen[-1], strict=True))  # not the last step's


def test_gptq_start_with_no_training_is_gptq():
    """Rounding offsets that start at GPTQ's choices give GPTQ's codes bit for bit before training."""
    gptq, *_ = _calibrated({"method": "gptq", "wbits": 3})
    start, *_ = _calibrated({"method": "signround", "wbits": 3, "round_init": "gptq", "steps": 1, "lr_round": 1e-12,
                             "lr_lwc": 1e-12})
    for name in LINEARS:
        assert torch.equal(gptq.linears[name].codes, start.linears[name].codes), name
        torch.testing.assert_close(gptq.linears[name].scale, start.linears[name].scale)


def test_round_init_gptq_is_refused_where_it_cannot_hold():
    with pytest.raises(ValueError, match="needs learned rounding"):
        CalibConfig(method="lsi", round_init="gptq")
    with pytest.raises(ValueError, match="lwc_param linear"):
        CalibConfig(method="signround", round_init="gptq", lwc_param="sigmoid")


@pytest.mark.parametrize("method", [m for m in methods.names() if methods.get(m).trains])
def test_trainable_count_is_what_the_block_quantizer_builds(method):
    cfg = tiny_llama_config()
    _, layer, _, _ = _block(cfg, n=1)
    arch = BlockArch.from_config(cfg)
    for over in ({}, {"let_down": True}, {"lsi_block_k": 4}):
        ccfg = CalibConfig(method=method, wbits=3, group_size=32, **over)
        assert trainable_count(arch, ccfg) == BlockQuantizer(layer, arch, ccfg).trainable_params(), over


def test_rounding_learning_rate_is_travel_over_steps_and_the_default_doubles_it_at_w4():
    """--lr-round 0: the offsets learn at lr_round_steps / steps (AutoRound's 1 / steps by default);
    the default method takes 2 / steps at 4 bits only, and a user's setting wins."""
    assert CalibConfig(wbits=3).lr_round_steps == 1.0 and CalibConfig(wbits=2).lr_round_steps == 1.0
    assert CalibConfig(wbits=4).lr_round_steps == 2.0
    assert CalibConfig(wbits=4, method="signround").lr_round_steps == 1.0
    assert CalibConfig(wbits=4, lr_round_steps=1.0).lr_round_steps == 1.0
    cfg = tiny_llama_config()
    _, layer, _x, _kw = _block(cfg, n=2)
    arch = BlockArch.from_config(cfg)

    def lrs(**over):
        bq = BlockQuantizer(layer, arch, CalibConfig(method="lwc-let-round", group_size=32, **over))
        return {g["component"]: g["lr"] for g in bq.param_groups(50)}

    assert lrs(wbits=3) == {"lwc": 1 / 50, "rounding": 1 / 50, "let": 5e-3}
    assert lrs(wbits=4) == {"lwc": 1 / 50, "rounding": 2 / 50, "let": 5e-3}
    assert lrs(wbits=4, lr_round=0.3)["rounding"] == 0.3
