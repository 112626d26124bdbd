"""pipeline.plan: its memory coefficients against what the code allocates, its CLI on the committed
70B and 8B configs, and its refusals."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from lsiq import methods
from lsiq.arch import BlockArch
from lsiq.config import CalibConfig
from lsiq.forward import autocast as _autocast
from lsiq.forward import block_forward
from lsiq.trainable import BlockQuantizer
from pipeline import plan

ROOT = Path(__file__).resolve().parent.parent
TRAINED = [m for m in methods.names() if methods.get(m).trains]  # every method that has a training step
MODELS = ROOT / "clusters" / "models"


def _block(hidden: int, inter: int) -> tuple[torch.nn.Module, BlockArch, LlamaConfig]:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=hidden // 64,
                      num_key_value_heads=hidden // 128, num_hidden_layers=1)
    cfg._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(cfg, 0).float()
    for p in layer.parameters():
        p.requires_grad_(False)
    return layer, BlockArch.from_config(cfg), cfg


def _step_inputs(arch, cfg, batch: int, seqlen: int) -> tuple[torch.Tensor, dict]:
    """A random micro-batch of block inputs and the layer's keyword arguments for it."""
    x = torch.randn(batch, seqlen, arch.hidden)
    pos = torch.arange(seqlen)[None]
    return x, {"position_embeddings": LlamaRotaryEmbedding(cfg)(x, pos), "position_ids": pos}


def _saved_bytes(layer, arch, cfg, calib: CalibConfig, batch: int, seqlen: int) -> tuple[int, int]:
    """Bytes autograd keeps for backward in one training step: (weight side, whole step)."""
    bq = BlockQuantizer(layer, arch, calib)
    x, kwargs = _step_inputs(arch, cfg, batch, seqlen)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        params = bq.effective()
        n_weight = len(saved)
        block_forward(layer, x, kwargs, params)

    def unique_bytes(ts: list[torch.Tensor]) -> int:
        return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in ts}.values())

    return unique_bytes(saved[:n_weight]), unique_bytes(saved)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("method,recompute", [*((m, False) for m in TRAINED), ("lsi", True)])
def test_saved_tensor_coefficients_match_the_code(method, recompute, precision):
    """The plan's per-step memory = a x (linear weights) + tokens x (a_h hidden + a_i inter) floats:
    measured here by solving for both terms from two micro-batch sizes, on two block shapes (bf16:
    under CPU autocast, which keeps the same tensors as CUDA's)."""
    for hidden, inter in [(256, 704), (256, 2048)]:
        layer, arch, cfg = _block(hidden, inter)
        calib = CalibConfig(method=method, wbits=4, group_size=64, recompute_weights=recompute)
        seqlen = 64
        with _autocast(torch.device("cpu"), precision):
            _, small = _saved_bytes(layer, arch, cfg, calib, 1, seqlen)
            _, large = _saved_bytes(layer, arch, cfg, calib, 3, seqlen)
        per_token = (large - small) / (2 * seqlen) / 4
        lin = sum(m * n for m, n in arch.linear_shapes().values())
        weight_coef = (small - per_token * seqlen * 4) / (4 * lin)
        expected_coef = (plan.SAVED_WEIGHTS_RECOMPUTE[precision] if recompute
                         else methods.get(method).saved_weights[precision])
        per_h, per_i = plan.SAVED_PER_TOKEN[precision]
        expected_tok = per_h * hidden + per_i * inter
        assert weight_coef == pytest.approx(expected_coef, rel=0.1), (hidden, inter, weight_coef)
        # LET's scaled norms add a little per token; without LET slightly less is saved
        assert per_token == pytest.approx(expected_tok, rel=0.05 if calib.uses_let else 0.2), (hidden, inter, per_token)


class _Traffic(TorchDispatchMode):
    """Bytes read and written by every op that runs a kernel other than a matmul: the sizes of its
    tensor arguments and results (views move no data; matmuls and attention are counted in FLOPs)."""

    COMPUTE = ("aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm", "aten._scaled_dot_product")
    FREE = ("aten._unsafe_view", "aten.alias", "aten.lift_fresh")  # aliases that is_view does not flag

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and not str(func).startswith(self.COMPUTE + self.FREE):
            self.bytes += sum(t.numel() * t.element_size() for t in tree_flatten((args, kwargs, out))[0]
                              if isinstance(t, torch.Tensor))
        return out


def _step_traffic(layer, arch, cfg, calib: CalibConfig, batch: int, seqlen: int) -> int:
    """Bytes moved by one training step (weights, block forward, loss, backward) outside matmuls."""
    bq = BlockQuantizer(layer, arch, calib)
    x, kwargs = _step_inputs(arch, cfg, batch, seqlen)
    target = torch.randn(batch, seqlen, arch.hidden)
    traffic = _Traffic()
    with traffic:
        with _autocast(torch.device("cpu"), calib.precision):
            out = block_forward(layer, x, kwargs, bq.effective())
        torch.nn.functional.mse_loss(out.float(), target, reduction="sum").backward()
    return traffic.bytes


TRAFFIC_SHAPES = [(256, 704), (512, 1792)]  # hidden, intermediate (the second: Llama-2-70B's 3.5x); _block's 2:1 GQA


def weight_traffic(method: str, recompute: bool, precision: str, hidden: int, inter: int) -> float:
    """One training step's weight-side traffic in float32 weights of the block's linears: the step's
    traffic less the part that grows with the tokens (from micro-batches of 1 and 3 samples)."""
    layer, arch, cfg = _block(hidden, inter)
    calib = CalibConfig(method=method, wbits=4, group_size=64, recompute_weights=recompute, precision=precision)
    small, large = (_step_traffic(layer, arch, cfg, calib, b, seqlen=64) for b in (1, 3))
    lin = sum(m * n for m, n in arch.linear_shapes().values())
    return (small - (large - small) / 2) / (4 * lin)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("method", TRAINED)
@pytest.mark.parametrize("recompute", [False, True])
def test_weight_traffic_coefficients_match_the_code(method, recompute, precision):
    """The plan's weight-side memory traffic per step, in float32 weights of the linears: measured as
    the part of a training step's traffic that does not grow with the tokens (two micro-batch
    sizes), on two block shapes."""
    for hidden, inter in TRAFFIC_SHAPES:
        expected = methods.get(method).weight_traffic[precision][int(recompute)]
        assert weight_traffic(method, recompute, precision, hidden, inter) == pytest.approx(expected, rel=0.03)


def test_persistent_parts_equal_what_the_block_quantizer_holds():
    layer, arch, _ = _block(256, 704)
    calib = CalibConfig(method="lsi", wbits=3, group_size=64, lsi_block_k=4)
    bq = BlockQuantizer(layer, arch, calib)
    assert plan.trainable_params(arch, calib) == bq.trainable_params()
    p = plan.PlanConfig(arch=arch, gpus=1, gpu_mem=10**12, calib=calib, nsamples=4, seqlen=64)
    mem = plan.memory_plan(p, recompute=False)
    factors = sum(b.numel() * b.element_size() for n, b in bq.named_buffers() if not n.endswith(".base"))
    assert mem["svd_factors"] == factors
    # the SVD base is the layer's own weight, not a copy
    for name, inc in bq.lsi.items():
        assert inc.base.data_ptr() == layer.get_submodule(name.replace("__", ".")).weight.data_ptr()


def test_recompute_gives_the_same_gradients_bit_for_bit():
    layer, arch, cfg = _block(128, 256)
    x = torch.randn(2, 16, 128)
    pos = torch.arange(16)[None]
    kwargs = {"position_embeddings": LlamaRotaryEmbedding(cfg)(x, pos), "position_ids": pos}
    grads = []
    for recompute in (False, True):
        torch.manual_seed(1)
        bq = BlockQuantizer(layer, arch, CalibConfig(method="lsi", wbits=3, group_size=64, recompute_weights=recompute))
        with torch.no_grad():
            for prm in bq.parameters():
                prm.add_(torch.randn_like(prm) * 0.01)
        block_forward(layer, x, kwargs, bq.effective()).pow(2).mean().backward()
        grads.append({n: prm.grad.clone() for n, prm in bq.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.equal(grads[0][n], grads[1][n]), n


# the budget of a 70B-class run, which these tests plan unless they say otherwise (later flags win)
BIG = ("--wbits", "4", "--group-size", "128", "--nsamples", "128", "--seqlen", "2048")


@pytest.fixture
def plan_cli(capsys):
    """Run ``python -m pipeline.plan BIG ARGS`` in-process: (exit status, last stdout line as JSON, stderr)."""

    def call(*args: str) -> tuple[int, dict, str]:
        try:
            rc = plan.main([*BIG, *args])
        except SystemExit as e:  # argparse and the config checks exit with a message
            rc = e.code if isinstance(e.code, int) else 2
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        out, err = capsys.readouterr()
        last = out.strip().splitlines()[-1] if out.strip() else ""
        return rc, json.loads(last) if last.startswith("{") else {}, err

    return call


def test_the_module_runs_as_a_command():
    proc = subprocess.run([sys.executable, "-m", "pipeline.plan", "--model-config", str(MODELS / "llama-3-8b"),
                           "--gpus", "2", "--gpu-mem", "24GB"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["fits"] is True


def test_llama2_70b_on_eight_24gb_gpus(plan_cli):
    rc, out, err = plan_cli("--model-config", str(MODELS / "llama-2-70b" / "config.json"), "--gpus", "8",
                             "--gpu-mem", "24GB", "--target-hours", "2")
    assert rc == 0, err
    assert out["fits"] is True and isinstance(out["hours"], float) and isinstance(out["per_worker_bytes"], int)
    assert out["per_worker_bytes"] <= 24 * 10**9 and out["recompute_weights"] is True  # does not fit without
    assert out["memory"]["peak"] == out["per_worker_bytes"]
    t = out["time"]
    assert out["hours"] == pytest.approx(80 * t["block_s"] / 3600, rel=1e-3)
    assert t["block_s"] == pytest.approx(t["svd_s"] + t["tokens_s"] + t["weight_s"] + t["allreduce_s"], rel=1e-3)
    assert out["meets_target"] is (out["hours"] <= 2)
    # 70B fp32 block: 855.6M linear weights
    assert out["memory"]["block_weights"] == 4 * (855_638_016 + 2 * 8192)


def test_forward_passes_are_planned(plan_cli, capsys):
    """The passes that do not train hold the block's weights twice and a micro-batch's activations,
    with the fp32 attention scores of GQA on a GPU; the plan picks the forward micro-batch that fits."""
    cfg70 = str(MODELS / "llama-2-70b" / "config.json")
    args = ("--model-config", cfg70, "--gpus", "8", "--method", "rtn", "--batch-size", "32")
    rc, out, err = plan_cli(*args, "--gpu-mem", "80GB")
    assert rc == 0, err
    s, mem = out["settings"], out["memory"]
    assert s["forward_batch_size"] == 4 and s["forward_batch_default"]  # a worker's share of the batch
    arch = plan.load_arch(cfg70)
    tokens = 4 * 2048
    floats = 2 * 8192 + 3 * 28672 + plan.GPU_GQA_SCORES * 64 * 2048  # scores and softmax of 64 heads
    assert mem["forward_activations"] == int(4 * tokens * floats)
    lin = sum(m * n for m, n in arch.linear_shapes().values())
    assert mem["phase_forward"] == mem["block_weights"] + 4 * lin + mem["forward_activations"] + 3 * 4 * tokens * 8192
    assert out["per_worker_bytes"] == mem["phase_forward"]  # RTN: nothing else is as large
    # on 17 GB the 4 samples do not fit: 2 do, and the flag says so
    rc, out, err = plan_cli(*args, "--gpu-mem", "17GB")
    assert rc == 0 and out["settings"]["forward_batch_size"] == 2 and not out["settings"]["forward_batch_default"]
    plan.main([*BIG, *args, "--gpu-mem", "17GB"])
    flags = capsys.readouterr().out.split("pipeline.quantize flags: ")[-1]
    assert "--forward-batch-size 2" in flags
    rc, out, err = plan_cli(*args, "--gpu-mem", "17GB", "--forward-batch-size", "4")
    assert rc == 1 and "lower --forward-batch-size" in err
    # OAC's loss gradient at the head: Llama-3-8B's 128k-word logits set the forward peak, and the
    # plan lowers the forward batch below a worker's 16 samples to fit
    rc, out, err = plan_cli("--model-config", str(MODELS / "llama-3-8b"), "--gpus", "8", "--gpu-mem", "24GB",
                            "--method", "oac", "--batch-size", "128")
    mem, fb = out["memory"], out["settings"]["forward_batch_size"]
    assert rc == 0 and fb < 16 and mem["phase_forward"] == mem["oac_head"] == out["per_worker_bytes"]
    assert mem["oac_head"] == 4 * (128256 * 4096 + fb * 2048 * (plan.OAC_HEAD_LOGITS * 128256 + 2 * 4096))
    # multi-head attention (no GQA) takes the memory-efficient kernel: no scores
    mha = plan.BlockArch("llama", 1024, 2816, 16, 16, 64, 1)
    assert plan.forward_floats_per_token(mha, 2048) == 2 * 1024 + 3 * 2816


def test_llama3_8b_fits_without_recompute_and_more_gpus_are_faster(plan_cli):
    cfg = str(MODELS / "llama-3-8b")
    # LSI: its learned parameters are small, so the all-reduce does not eat what more GPUs save (with
    # learned rounding, one gradient per weight, it does on this link)
    rc8, out8, _ = plan_cli("--model-config", cfg, "--gpus", "8", "--gpu-mem", "24GB", "--method", "lsi")
    rc2, out2, _ = plan_cli("--model-config", cfg, "--gpus", "2", "--gpu-mem", "24GB", "--batch-size", "8",
                            "--method", "lsi")
    assert rc8 == 0 and rc2 == 0
    assert out8["recompute_weights"] is False and out8["blocks"] == 32
    assert out8["time"]["tokens_s"] == pytest.approx(out2["time"]["tokens_s"] / 4, rel=1e-3)
    assert out8["time"]["weight_s"] == pytest.approx(out2["time"]["weight_s"])  # repeated on every worker
    assert out8["hours"] < out2["hours"]


def test_a_plan_that_does_not_fit_is_refused(plan_cli):
    rc, out, err = plan_cli("--model-config", str(MODELS / "llama-2-70b"), "--gpus", "8", "--gpu-mem", "12GB")
    assert rc == 1
    assert out["fits"] is False and out["per_worker_bytes"] > 12 * 10**9
    assert "does not fit" in err and "GiB" in err


def test_bad_inputs_get_clear_errors(tmp_path, plan_cli):
    rc, _, err = plan_cli("--model-config", str(tmp_path / "nope.json"), "--gpus", "1", "--gpu-mem", "24GB")
    assert rc != 0 and "no model config" in err
    (tmp_path / "gpt2.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    rc, _, err = plan_cli("--model-config", str(tmp_path / "gpt2.json"), "--gpus", "1", "--gpu-mem", "24GB")
    assert rc != 0 and "unsupported architecture" in err
    rc, _, err = plan_cli("--model-config", str(MODELS / "llama-3-8b"), "--gpus", "1", "--gpu-mem", "24GB",
                           "--group-size", "100")
    assert rc != 0 and "group size 100" in err
    rc, _, err = plan_cli("--model-config", str(MODELS / "llama-3-8b"), "--gpus", "1", "--gpu-mem", "lots")
    assert rc != 0 and "not a size" in err
    for flag, value in (("--gpus", "0"), ("--gpu-mem", "0")):
        args = {"--gpus": "1", "--gpu-mem": "24GB", flag: value}
        rc, _, err = plan_cli("--model-config", str(MODELS / "llama-3-8b"), *[x for kv in args.items() for x in kv])
        assert rc == 2 and f"{flag} must be" in err, (flag, err)


@pytest.mark.parametrize("svd", ["full", "gram"])
def test_time_formula_by_hand(svd):
    """The documented formula, evaluated by hand for one small case, with either SVD route."""
    arch = BlockArch("llama", 256, 512, 4, 2, 64, 3)
    calib = CalibConfig(method="lsi", wbits=4, group_size=64, epochs=2, batch_size=2, svd=svd)
    hw = plan.Hardware(tflops=1.0, bf16_tflops=3.0, mem_gbs=100.0, svd_tflops=0.1, link_gbps=1.0, eigh_tflops=0.2)
    p = plan.PlanConfig(arch=arch, gpus=2, gpu_mem=10**12, calib=calib, nsamples=8, seqlen=32, hw=hw)
    t = plan.time_plan(p, recompute=False)
    shapes = [(256, 256), (128, 256), (128, 256), (256, 256), (512, 256), (512, 256), (256, 512)]
    lin = sum(m * n for m, n in shapes)
    tokens = (4 + 3 * 2) * 4 * 32 * (2 * lin + 2 * 32 * 256) / 1e12
    steps = 2 * 4
    # LSI's recomposition and its gradient at 1 TFLOP/s; the weight side's traffic, 62.6 fp32 weights
    # of the linears per step (the method's weight_traffic), at 100 GB/s
    weight = steps * (2 * sum(2 * m * n * min(m, n) for m, n in shapes) / 1e12 + 62.6 * 4 * lin / 100e9)
    comm = steps * (4 * plan.trainable_params(arch, calib) * 8 / 1e9)  # 2 (N-1)/N = 1 for N = 2

    def factor_bytes(m, n):
        r = min(m, n)
        return 4 * (m * r + r + r * n)

    if svd == "full":
        # SVDs over two workers, largest first to the least loaded (ties to rank 0): down -> 0, gate -> 1,
        # up -> 0, o -> 1, q -> 1, k -> 0, v -> 0. Rank 1 computes the most (gate, o, q); rank 0 receives
        # gate, o, q's factors, rank 1 receives down, up, k, v's (more): that is the broadcast term.
        def flops(m, n):
            return 6 * max(m, n) * min(m, n) ** 2 + 20 * min(m, n) ** 3

        slowest = (flops(512, 256) + 2 * flops(256, 256)) / 0.1e12
        received = 2 * factor_bytes(512, 256) + 2 * factor_bytes(128, 256)
    else:
        # the eigensolver's 9 k^3 ranks them: the five k = 256 tie (by name: down, gate, up, o, q),
        # then k and v (k = 128): down -> 0, gate -> 1, up -> 0, o -> 1, q -> 0, k -> 1, v -> 1.
        # Rank 0 (down, up, q) is the slowest: three 9 k^3 at 0.2 TFLOP/s plus the Gram route's
        # matmuls, 4 k^2 max(m, n) each, at 1 TFLOP/s; rank 1 receives down, up, q's factors (more)
        def seconds(m, n):
            k = min(m, n)
            return 9 * k**3 / 0.2e12 + 4 * k * k * max(m, n) / 1e12

        slowest = seconds(256, 512) + seconds(256, 256) + seconds(512, 256)
        received = 2 * factor_bytes(512, 256) + factor_bytes(256, 256)
    svd_s = slowest + received * 8 / 1e9
    assert t["tokens_s"] == pytest.approx(tokens) and t["weight_s"] == pytest.approx(weight)
    assert t["allreduce_s"] == pytest.approx(comm) and t["svd_s"] == pytest.approx(svd_s)
    assert t["hours"] == pytest.approx(3 * (tokens + weight + comm + svd_s) / 3600)
    assert math.isclose(t["steps_per_block"], steps)


def test_bf16_runs_the_training_passes_at_the_bf16_rate():
    arch = BlockArch("llama", 256, 512, 4, 2, 64, 3)
    hw = plan.Hardware(tflops=1.0, bf16_tflops=4.0, mem_gbs=100.0, svd_tflops=0.1, link_gbps=1.0)
    times = {}
    for precision in ("fp32", "bf16"):
        calib = CalibConfig(method="lsi", wbits=4, group_size=64, epochs=2, batch_size=2, precision=precision)
        times[precision] = plan.time_plan(plan.PlanConfig(arch=arch, gpus=2, gpu_mem=10**12, calib=calib, nsamples=8,
                                                          seqlen=32, hw=hw), recompute=False)
    lin = sum(m * n for m, n in arch.linear_shapes().values())
    per_pass = 4 * 32 * (2 * lin + 2 * 32 * 256) / 1e12  # one pass over a worker's 4 samples at 1 TFLOP/s
    assert times["fp32"]["tokens_s"] == pytest.approx(10 * per_pass)  # 4 forward + 3 x 2 epochs
    assert times["bf16"]["tokens_s"] == pytest.approx(4 * per_pass + 6 * per_pass / 4)
    assert times["bf16"]["svd_s"] == times["fp32"]["svd_s"]  # the SVD stays float32


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fp_block_coefficients_match_the_code(precision):
    """Block i+1 under --cross-layer (and OAC's recomputed backward): a frozen FP block run for its
    input gradient keeps FP_BLOCK_PER_TOKEN floats per token, and its weights only as bf16 copies."""
    for hidden, inter in [(256, 704), (256, 2048)]:
        layer, arch, cfg = _block(hidden, inter)
        params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
        seqlen, got = 64, []
        for batch in (1, 3):
            x, kwargs = _step_inputs(arch, cfg, batch, seqlen)
            x.requires_grad_()
            saved: list[torch.Tensor] = []
            with torch.autograd.graph.saved_tensors_hooks(lambda t, s=saved: s.append(t) or t, lambda t: t), \
                    _autocast(torch.device("cpu"), precision):
                block_forward(layer, x * 1.0, kwargs)
            storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
            got.append(sum(v for k, v in storages.items() if k not in params))
        per_token = (got[1] - got[0]) / (2 * seqlen) / 4
        weights = (got[0] - per_token * seqlen * 4) / (4 * sum(m * n for m, n in arch.linear_shapes().values()))
        fp_h, fp_i = plan.FP_BLOCK_PER_TOKEN[precision]
        assert per_token == pytest.approx(fp_h * hidden + fp_i * inter, rel=0.05), (hidden, inter, per_token)
        assert weights == pytest.approx(plan.FP_BLOCK_SAVED_WEIGHTS[precision], abs=0.05), (hidden, inter, weights)


def test_hessian_bytes_equal_what_the_code_builds():
    from lsiq.stats import input_autocorrelations

    layer, arch, cfg = _block(256, 704)
    x = torch.randn(2, 16, 256)
    pos = torch.arange(16)[None]
    kwargs = {"position_embeddings": LlamaRotaryEmbedding(cfg)(x, pos), "position_ids": pos}
    for dtype in ("float64", "float32"):
        calib = CalibConfig(method="gptq", wbits=4, group_size=64, batch_size=2, solve_dtype=dtype)
        hess = input_autocorrelations(layer, x, kwargs, calib, groups=arch.input_groups)
        assert {h.dtype for h in hess.values()} == {getattr(torch, dtype)}
        assert hess["self_attn.q_proj"] is hess["self_attn.v_proj"]  # one matrix per input: q, k, v share theirs
        unique = {h.data_ptr(): h.numel() * h.element_size() for h in hess.values()}
        p = plan.PlanConfig(arch=arch, gpus=1, gpu_mem=10**12, calib=calib, nsamples=2, seqlen=16)
        mem = plan.memory_plan(p, recompute=False)
        assert len(unique) == len(arch.input_groups) == 4
        assert mem["hessians"] == sum(unique.values()), dtype
        # at the worst solve (down_proj's, the last and widest) only its own Hessian is left
        assert mem["solve_hessians"] == hess["mlp.down_proj"].numel() * hess["mlp.down_proj"].element_size()


def test_gptq_frees_each_hessian_once_used(monkeypatch):
    """What the plan's solve phase assumes: GPTQ pops every Hessian, so only the unsolved ones stay
    (a group's shared one until the group's last linear is solved)."""
    import gc
    import weakref

    import lsiq.methods.gptq as gptq_method
    from lsiq.parallel import SampleShard

    layer, arch, cfg = _block(256, 704)
    shared = {g[0]: torch.eye(layer.get_submodule(g[0]).in_features, dtype=torch.float64) for g in arch.input_groups}
    hess = {n: shared[g[0]] for g in arch.input_groups for n in g}
    alive = weakref.WeakValueDictionary(shared)
    del shared
    held = []
    solve = gptq_method.gptq_quantize

    def tracked(w, h, *a, **k):
        gc.collect()
        held.append(sorted(n.split(".")[-1] for n in alive))
        return solve(w, h, *a, **k)

    monkeypatch.setattr(gptq_method, "gptq_quantize", tracked)
    job = gptq_method.BlockJob(layer, {}, None, None, arch, CalibConfig(method="gptq", wbits=4, group_size=64),
                               SampleShard.whole(1))
    gptq_method.gptq_linears(job, hess)
    assert hess == {}
    four, three, two = ["down_proj", "gate_proj", "o_proj", "q_proj"], ["down_proj", "gate_proj", "o_proj"], \
        ["down_proj", "gate_proj"]
    assert held == [four, four, four, three, two, two, ["down_proj"]]  # q, k, v, o, gate, up, down


def test_the_other_methods_are_planned(plan_cli):
    """GPTQ, OAC, --lowrank and --cross-layer: the parts each adds, and the refusal that names the
    solves when they are what does not fit (70B: down_proj's [28672, 28672] Hessian in float64)."""
    cfg = str(MODELS / "llama-2-70b")
    base = ("--model-config", cfg, "--gpus", "8")
    rc, lsi, _ = plan_cli(*base, "--gpu-mem", "80GB")
    assert rc == 0 and lsi["memory"]["hessians"] == 0 and lsi["time"]["solve_s"] == 0
    rc, gptq64, err = plan_cli(*base, "--gpu-mem", "24GB", "--method", "gptq", "--solve-dtype", "float64")
    assert rc == 1 and gptq64["memory"]["peak"] == gptq64["memory"]["phase_solve"] and "--solve-dtype float32" in err
    # one Hessian per input: q/k/v's, o's, gate/up's at 8192 wide, down's at 28672
    assert gptq64["memory"]["hessians"] == 8 * (3 * 8192**2 + 28672**2)
    assert gptq64["memory"]["solve_hessians"] == 8 * 28672**2  # the others are freed by down_proj's turn
    rc, gptq, _ = plan_cli(*base, "--gpu-mem", "24GB", "--method", "gptq")  # float32, a GPU's auto
    assert rc == 0 and gptq["memory"]["hessians"] == gptq64["memory"]["hessians"] // 2
    assert gptq["settings"]["solve_dtype"] == "float32" and gptq["hours"] < gptq64["hours"]
    rc, gptq80, _ = plan_cli(*base, "--gpu-mem", "80GB", "--method", "gptq")
    assert rc == 0 and gptq80["time"]["solve_s"] > 0 and gptq80["time"]["steps_per_block"] == 0
    rc, oac, _ = plan_cli(*base, "--gpu-mem", "80GB", "--method", "oac")
    assert rc == 0 and oac["time"]["oac_pass_s"] > 0 and oac["hours"] > gptq80["hours"]
    # what the calibrator itself reserves for the OAC pass (pipeline.calibrator.oac_forward)
    from pipeline.calibrator import CACHES_AT_ONCE

    host = oac["host"]["activation_caches"] + oac["host"]["oac_caches"]
    assert host == (CACHES_AT_ONCE + 80) * 16 * 2048 * 8192 * 4
    rc, qera, _ = plan_cli(*base, "--gpu-mem", "80GB", "--lowrank", "qera", "--rank", "16")
    assert rc == 0 and qera["memory"]["solve_transient"] > 0 and qera["time"]["solve_s"] > 0
    assert qera["time"]["svd_s"] == lsi["time"]["svd_s"] and qera["hours"] > lsi["hours"]
    assert qera["settings"]["lowrank"] == "qera" and qera["settings"]["rank"] == 16
    rc, cross, _ = plan_cli(*base, "--gpu-mem", "80GB", "--cross-layer")
    m = cross["memory"]
    assert rc == 0 and m["next_block_weights"] == m["block_weights"]
    assert cross["host"]["block_tensors"] == 2 * lsi["host"]["block_tensors"]
    assert cross["time"]["tokens_s"] > lsi["time"]["tokens_s"] and cross["time"]["weight_s"] == lsi["time"]["weight_s"]


def test_solve_time_by_hand():
    """GPTQ's solves (and its column loop) are repeated on every worker; the low-rank corrections
    are shared out between the two workers as the SVDs are (svd_owners), and the slower one sets the time."""
    arch = BlockArch("llama", 256, 512, 4, 2, 64, 3)
    shapes = [(256, 256), (128, 256), (128, 256), (256, 256), (512, 256), (512, 256), (256, 512)]
    hw = plan.Hardware(tflops=1.0, fp64_tflops=0.25, svd_tflops=0.1)
    tokens = 4 * 32  # one of two workers' 4 samples
    # one matrix per input (q/k/v, o, gate/up, down: all 256 wide but down's 512), not per linear
    accumulate = 2 * tokens * (3 * 256**2 + 512**2)

    def svd(m, n):
        return 6 * max(m, n) * min(m, n) ** 2 + 20 * min(m, n) ** 3

    qera = [(n**3 // 3 + 2 * m * n * n + 8 * n * n, svd(m, n)) for m, n in shapes]
    from pipeline.plan import svd_owners

    by_name = svd_owners(dict(zip(arch.linear_shapes(), shapes, strict=True)), 2)
    owners = [by_name[k] for k in arch.linear_shapes()]
    assert sorted(set(owners)) == [0, 1]
    loads = [tuple(sum(q[i] for q, o in zip(qera, owners, strict=True) if o == r) for i in (0, 1)) for r in (0, 1)]
    gptq = [(sum(2 * n**3 + m * n * n for m, n in shapes), 0)] * 2
    for kw, per_worker in [({"method": "gptq"}, gptq), ({"method": "lsi", "lowrank": "qera", "rank": 8}, loads)]:
        for dtype in ("float64", "float32"):
            calib = CalibConfig(wbits=4, group_size=64, epochs=2, batch_size=2, solve_dtype=dtype, **kw)
            t = plan.time_plan(plan.PlanConfig(arch=arch, gpus=2, gpu_mem=10**12, calib=calib, nsamples=8, seqlen=32,
                                               hw=hw), recompute=False)
            mm_rate = 0.25e12 if dtype == "float64" else 1e12
            # the slower worker in seconds (products and SVDs run at different rates), and GPTQ's
            # column loop at gptq_column_us per input column
            columns = sum(n for _, n in shapes) * hw.gptq_column_us * 1e-6 if kw["method"] == "gptq" else 0.0
            want = max((accumulate + mm) / mm_rate + fact / 0.1e12 + columns for mm, fact in per_worker)
            assert t["solve_s"] == pytest.approx(want), (kw, dtype)


def test_collective_timeout_advice(plan_cli, capsys):
    """A worker that waits in a collective while another runs an SVD alone: the plan asks for a
    --collective-timeout above that wait when the default would be too tight, and quantize takes it."""
    from pipeline.config import parse_quantize_args

    base = ("--model-config", str(MODELS / "llama-2-70b"), "--gpus", "8", "--gpu-mem", "24GB", "--method", "lsi")
    rc, gram, _ = plan_cli(*base)
    rc, fast, _ = plan_cli(*base, "--svd", "full")
    assert rc == 0 and 0 < gram["time"]["collective_wait_s"] < fast["time"]["collective_wait_s"] < 60
    rc, slow, _ = plan_cli(*base, "--svd", "full", "--svd-tflops", "0.1")  # 5x slower: one MLP SVD alone takes ~225 s
    assert rc == 0 and slow["time"]["collective_wait_s"] == pytest.approx(5 * fast["time"]["collective_wait_s"])
    plan.main([*BIG, *base, "--svd", "full", "--svd-tflops", "0.1"])
    out = capsys.readouterr().out
    flag = out.split("--collective-timeout ")[-1].split()[0]  # the flags line comes last
    assert "note: a worker waits" in out and float(flag) >= 2 * slow["time"]["collective_wait_s"]
    one = ("--model", "m", "--output", "o", "--calib", "c")
    assert parse_quantize_args([*one, "--collective-timeout", flag]).collective_timeout == float(flag)
    with pytest.raises(SystemExit, match="collective-timeout must be > 0"):
        parse_quantize_args([*one, "--collective-timeout", "0"])


if __name__ == "__main__":  # python -m tests.test_plan: the measured WEIGHT_TRAFFIC coefficients
    for prec in ("fp32", "bf16"):
        for meth in TRAINED:
            got = [[round(weight_traffic(meth, rec, prec, h, i), 1) for h, i in TRAFFIC_SHAPES] for rec in (False, True)]
            print(f"{prec} {meth:8s} without / with --recompute-weights, by shape {TRAFFIC_SHAPES}: {got[0]} / {got[1]}")


def _record_optimized(monkeypatch) -> dict[int, int]:
    """Every tensor handed to a torch optimizer from now on, by id: its element count."""
    optimized: dict[int, int] = {}
    init = torch.optim.Optimizer.__init__

    def recording_init(self, params, defaults):
        params = list(params)
        for g in params:
            for t in (g["params"] if isinstance(g, dict) else [g]):
                optimized[id(t)] = t.numel()
        init(self, params, defaults)

    monkeypatch.setattr(torch.optim.Optimizer, "__init__", recording_init)
    return optimized


@pytest.mark.parametrize("method", methods.names())
def test_planned_trainable_parameters_are_what_the_calibrator_optimizes(method, monkeypatch):
    """Every method: the plan's learned-parameter count (its optimizer state and all-reduce bytes
    follow from it) equals the parameters the real calibration hands its optimizers (none for the
    closed-form methods)."""
    from lsiq.block import calibrate_block
    from lsiq.forward import block_forward

    layer, arch, cfg = _block(128, 256)
    calib = CalibConfig(method=method, wbits=3, group_size=64, steps=1, batch_size=2, lsi_block_k=4)
    optimized = _record_optimized(monkeypatch)
    x, kw = _step_inputs(arch, cfg, 2, 16)
    with torch.no_grad():
        y = block_forward(layer, x, kw)
    grads = torch.randn_like(y) if methods.get(method).needs_output_grads else None
    res = calibrate_block(layer, kw, x, y, arch, calib, fp_inputs=x, output_grads=grads)
    assert sum(optimized.values()) == plan.trainable_params(arch, calib) == res.trainable_params
    assert (plan.trainable_params(arch, calib) > 0) == methods.get(method).trains


def test_plan_and_quantize_flags_have_the_same_defaults_and_help():
    """One source of settings: every flag the two commands share has the same default, help and
    choices (--recompute-weights is the plan's own: it can decide it, 'auto')."""
    from pipeline.config import build_parser as quantize_parser

    def flags(parser):
        return {a.dest: (a.option_strings, a.default, a.help, a.choices) for a in parser._actions if a.dest != "help"}

    q, p = flags(quantize_parser()), flags(plan.build_parser())
    shared = (set(q) & set(p)) - {"recompute_weights"}
    assert {"method", "wbits", "abits", "group_size", "nsamples", "seqlen", "steps", "epochs", "batch_size",
            "precision", "solve_dtype", "svd", "svd_dtype", "lowrank", "rank"} <= shared
    for dest in sorted(shared):
        assert q[dest] == p[dest], dest


@pytest.mark.parametrize("family", ["phi3", "gemma2", "gemma3_text", "olmo2", "qwen3"])
@pytest.mark.parametrize("method,let_down", [("lwc-let-round", True), ("lsi", False)])
def test_planned_trainable_parameters_on_every_family(family, method, let_down, monkeypatch):
    """The plan's learned-parameter count equals what the calibration optimizes on every family's
    block: LET's pairs (none folded into OLMo 2's post-norms, no rotary pair beside q/k norms, Phi-3's
    row ranges), LWC's groups and the rounding offsets of its fused linears."""
    from lsiq.archs import BlockArch as Arch
    from lsiq.block import calibrate_block
    from lsiq.capture import capture_first_layer_inputs
    from lsiq.forward import block_forward
    from tests.conftest import tiny_family_model

    model = tiny_family_model(family)
    arch = Arch.from_config(model.config)
    x, kw = capture_first_layer_inputs(model, torch.randint(0, 1000, (2, 16)))
    layer = model.model.layers[0]
    calib = CalibConfig(method=method, wbits=3, group_size=16, steps=1, batch_size=2, lsi_block_k=4, let_down=let_down)
    optimized = _record_optimized(monkeypatch)
    with torch.no_grad():
        y = block_forward(layer, x, kw)
    res = calibrate_block(layer, kw, x, y, arch, calib, fp_inputs=x)
    assert sum(optimized.values()) == plan.trainable_params(arch, calib) == res.trainable_params
    let = sum(math.prod(p.shape) for p in arch.let_pairs if let_down or not p.optional)
    assert let == arch.let_parameters(let_down) > 0


def test_every_family_is_planned_from_its_config(plan_cli):
    """Qwen3-32B and Gemma-3-27B (its language model, from the published multimodal config) are
    planned from their config.json: the family's linears, input groups and LET pairs."""
    rc, qwen, err = plan_cli("--model-config", str(MODELS / "qwen3-32b"), "--gpus", "8", "--gpu-mem", "80GB")
    assert rc == 0, err
    a = qwen["architecture"]
    assert qwen["blocks"] == 64 and a["family"] == "qwen3" and a["let_pairs"] == ["qkv", "fc1", "out"]
    assert a["linears"]["self_attn.q_proj"] == [8192, 5120] and a["linears"]["mlp.down_proj"] == [5120, 25600]
    rc, gemma, err = plan_cli("--model-config", str(MODELS / "gemma-3-27b"), "--gpus", "8", "--gpu-mem", "80GB",
                              "--method", "gptq")
    assert rc == 0, err
    a = gemma["architecture"]
    assert gemma["blocks"] == 62 and a["family"] == "gemma3" and a["model_type"] == "gemma3_text"
    assert a["linears"]["self_attn.q_proj"] == [4096, 5376] and a["linears"]["mlp.gate_proj"] == [21504, 5376]
    # float32 Hessians, one per input: q/k/v's and gate/up's 5376 wide, o's 32 x 128, down's 21504
    assert len(a["input_groups"]) == 4 and gemma["memory"]["hessians"] == 4 * (2 * 5376**2 + 4096**2 + 21504**2)


# ---------------------------------------------------------------------------------------- mixture-of-experts models
@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe"])
@pytest.mark.parametrize("method,let_down", [("lwc-let-round", True), ("lsi", False)])
def test_planned_trainable_parameters_of_a_moe_block(family, method, let_down, monkeypatch):
    """A mixture-of-experts block's learned parameters, planned from its arch alone, are what its
    calibration (lsiq.moe: the attention, the shared experts, the routed experts in groups of two)
    hands its optimizers: LET's attention pairs, LWC's groups and rounding offsets of every expert's
    linears, and with --let-down each expert's own up -> down pair."""
    from lsiq.archs import BlockArch as Arch
    from lsiq.block import calibrate_block
    from tests.conftest import tiny_family_model
    from tests.test_moe import _layer_inputs

    model = tiny_family_model(family)
    layer, x, kw, last = _layer_inputs(model, n=2)
    arch = Arch.from_config(model.config).for_layer(last)
    calib = CalibConfig(method=method, wbits=3, group_size=16, steps=1, batch_size=2, lsi_block_k=4, let_down=let_down,
                        expert_group=2, expert_min_tokens=0.0)
    optimized: dict[int, torch.Tensor] = {}  # held, so that a freed unit's tensor ids are not reused
    init = torch.optim.Optimizer.__init__

    def recording_init(self, params, defaults):
        params = list(params)
        for g in params:
            for t in (g["params"] if isinstance(g, dict) else [g]):
                optimized[id(t)] = t
        init(self, params, defaults)

    monkeypatch.setattr(torch.optim.Optimizer, "__init__", recording_init)
    with torch.no_grad():
        y = block_forward(layer, x, kw)
    res = calibrate_block(layer, kw, x, y, arch, calib, last, fp_inputs=x, measure_after=False)
    assert res.moe["rtn_fallback"] == [] and res.moe["units"][-1] == "experts 2-3"
    assert sum(t.numel() for t in optimized.values()) == plan.trainable_params(arch, calib) == res.trainable_params > 0


# DeepSeek-V3's mixture-of-experts layer, counted by hand from its config.json: MLA (q_a, its norm, q_b,
# kv_a with the rope key, its norm, kv_b, o), 256 experts' gate/up and down, the router and its score
# correction, the shared expert, the two norms
DEEPSEEK_MOE_LAYER = (1536 * 7168 + 1536 + 128 * 192 * 1536 + 576 * 7168 + 512 + 128 * 256 * 512 + 7168 * 128 * 128
                      + 256 * 3 * 2048 * 7168 + 256 * 7168 + 256 + 3 * 2048 * 7168 + 2 * 7168)
A100 = ("--tflops", "15", "--bf16-tflops", "200", "--fp64-tflops", "8", "--svd-tflops", "1", "--eigh-tflops", "1",
        "--mem-gbs", "1500", "--link-gbps", "100")


def test_deepseek_v3_is_planned_on_eight_80gb_gpus(plan_cli):
    """DeepSeek-V3 from its published config.json: 3 dense layers planned as dense blocks, 58 mixture-of-
    experts layers whose float32 weights (43 GiB) stay on the device while the expert groups are
    calibrated one at a time; the plan picks the largest group that fits 80 GB and passes it as
    --expert-group; GPTQ and the default method both fit. On 40 GB the layer itself does not."""
    rc, out, err = plan_cli("--model-config", str(MODELS / "deepseek-v3"), "--gpus", "8", "--gpu-mem", "80GB",
                            "--method", "gptq", *A100)
    assert rc == 0, err
    assert out["layers"] == {"dense": 3, "moe": 58} and out["blocks"] == 61
    ex = out["experts"]
    assert (ex["routed"], ex["width"], ex["top_k"], ex["shared_width"], ex["mla"]) == (256, 2048, 8, 2048,
                                                                                       [1536, 512, 128, 64, 128])
    mem = out["memory"]
    assert mem["layer_weights"] == 4 * DEEPSEEK_MOE_LAYER
    assert out["fits"] and mem["peak"] == out["per_worker_bytes"] <= 80 * 10**9
    assert mem["peak"] == mem["layer_weights"] + mem["results"] + mem["expert_group_stage"]  # the expert units
    # the default (256 / 8 = 32 experts a group) does not fit: the plan halves it and says so
    group = out["settings"]["expert_group"]
    assert group < 32 and ex["units"] == 1 + 256 // group and out["dense"]["fits"]
    assert out["hours"] == pytest.approx((58 * out["time"]["block_s"] + 3 * out["dense"]["time"]["block_s"]) / 3600,
                                         rel=1e-3)
    # the same run with that group size set: the same plan; one expert a group needs less memory
    rc, same, _ = plan_cli("--model-config", str(MODELS / "deepseek-v3"), "--gpus", "8", "--gpu-mem", "80GB",
                           "--method", "gptq", "--expert-group", str(group), *A100)
    assert rc == 0 and same["memory"] == mem and same["hours"] == out["hours"]
    rc, one, _ = plan_cli("--model-config", str(MODELS / "deepseek-v3"), "--gpus", "8", "--gpu-mem", "80GB",
                          "--method", "gptq", "--expert-group", "1", *A100)
    assert one["memory"]["expert_group_stage"] < mem["expert_group_stage"] and one["experts"]["units"] == 257
    rc, default, err = plan_cli("--model-config", str(MODELS / "deepseek-v3"), "--gpus", "8", "--gpu-mem", "80GB", *A100)
    assert rc == 0 and default["settings"]["method"] == methods.default_method(4), err
    rc, small, err = plan_cli("--model-config", str(MODELS / "deepseek-v3"), "--gpus", "8", "--gpu-mem", "40GB",
                              "--method", "gptq")
    assert rc == 1 and not small["fits"] and "one mixture-of-experts layer's weights" in err


def test_moe_models_are_planned_and_refusals_said(plan_cli):
    """Qwen3-30B-A3B and Mixtral-8x7B from their config.json (every layer a mixture of experts, no shared
    expert): the experts split evenly over the workers by default; the printed plan names the groups;
    what a mixture-of-experts block cannot do is refused as pipeline.quantize refuses it."""
    rc, qwen, err = plan_cli("--model-config", str(MODELS / "qwen3-30b-a3b"), "--gpus", "8", "--gpu-mem", "24GB",
                             "--method", "gptq")
    assert rc == 0, err
    assert qwen["layers"] == {"moe": 48} and qwen["experts"]["routed"] == 128 and qwen["experts"]["top_k"] == 8
    assert qwen["settings"]["expert_group"] == 16 and qwen["experts"]["units"] == 8 and "dense" not in qwen
    assert qwen["architecture"]["linears"]["mlp.experts.127.down_proj"] == [2048, 768]
    rc, mixtral, err = plan_cli("--model-config", str(MODELS / "mixtral-8x7b"), "--gpus", "8", "--gpu-mem", "80GB",
                                "--method", "lsi")
    assert rc == 0, err
    assert mixtral["experts"]["routed"] == 8 and mixtral["architecture"]["linears"][
        "block_sparse_moe.experts.7.w2"] == [4096, 14336]
    rc, _, err = plan_cli("--model-config", str(MODELS / "qwen3-30b-a3b"), "--gpus", "8", "--gpu-mem", "80GB",
                          "--cross-layer")
    assert rc != 0 and "--cross-layer is not supported for mixture-of-experts models" in err


def test_moe_plan_prints(capsys):
    """The printed plan of DeepSeek-V3 names its layers, the expert groups and the flags to pass."""
    assert plan.main([*BIG, "--model-config", str(MODELS / "deepseek-v3"), "--gpus", "8", "--gpu-mem", "80GB",
                      "--method", "gptq"]) == 0
    out = capsys.readouterr().out
    assert "3 dense layers, then 58 mixture-of-experts layers of 256 routed experts 2048 wide, 8 per token" in out
    assert "the shared experts and " in out and "--expert-group " in out and "layer_weights" in out
