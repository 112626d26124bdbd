"""Mixture-of-experts families on tiny random models (transformers' own classes: 4 experts, 2 per
token, hidden 64, 2 layers): the experts' layouts (fused in the module, one linear per expert in
checkpoints), LET's exact pairs, all-expert calibration and its RTN fallback, every method on expert
linears, export in GPTQ v1 and compressed-tensors with the names vLLM and transformers read, loading
in transformers, data-parallel workers sharing the experts out, one Ray pipeline run and clear refusals."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lsiq import expert_layout
from lsiq.archs import BlockArch
from lsiq.block import calibrate_block
from lsiq.capture import capture_layer_inputs
from lsiq.config import CalibConfig
from lsiq.forward import block_forward, forward_all
from lsiq.let import LET
from lsiq.moe import ExpertGroup, group_unit, mlp_inputs, swapped
from lsiq.parallel import SampleShard, shard_range
from pipeline import formats
from pipeline.checkpoint import Checkpoint
from pipeline.model_io import MANIFEST, load_quantized
from tests.conftest import MOE_FAMILIES, WINDOW, copy_tokenizer, tiny_family_model, write_hub_checkpoint
from tests.test_families import _ids, _loads_like_ours, _rel, quantize_in_process

# The per-expert names each family's checkpoints (the Hub's), vLLM's loaders and our output use
EXPERT_NAMES = {"mixtral": "block_sparse_moe.experts.{e}.{w}", "qwen3_moe": "mlp.experts.{e}.{w}",
                "deepseek_v3": "mlp.experts.{e}.{w}", "gpt_oss": "mlp.experts.{e}.{w}"}
ROLE_NAMES = {"mixtral": ("w1", "w3", "w2")}
ROUTERS = {"mixtral": "block_sparse_moe.gate", "qwen3_moe": "mlp.gate", "deepseek_v3": "mlp.gate", "gpt_oss": "mlp.router"}


@pytest.fixture(scope="module")
def moe_checkpoints(tmp_path_factory, smollm2_dir):
    """``get(family) -> checkpoint dir``: a tiny random model per family written by transformers' own
    save_pretrained (the Hub's per-expert layout), sharded, with SmolLM2's tokenizer."""
    done: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in done:
            out = tmp_path_factory.mktemp(family) / "model"
            done[family] = copy_tokenizer(write_hub_checkpoint(tiny_family_model(family), out), smollm2_dir)
        return done[family]

    return get


def _layer_inputs(model, n: int = 4, seed: int = 0):
    """The inputs of the model's last layer (a routed one) and the FP block's outputs."""
    x, inputs = capture_layer_inputs(model, _ids(n, 3 * WINDOW, seed))
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers[:-1]):
            x = forward_all(layer, x, inputs[i], 2)
    last = len(model.model.layers) - 1
    return model.model.layers[last], x, inputs[last], last


# ---------------------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_descriptor_and_layouts(family, moe_checkpoints):
    """The arch names the attention's and shared experts' nn.Linears and one 2-D linear per expert and
    role; splitting the fused parameters and fusing them back is exact; the Hub layout that
    save_pretrained writes reads back as the module's own state dict; DeepSeek's first layer is dense."""
    model = tiny_family_model(family)
    arch = BlockArch.from_config(model.config)
    last = len(model.model.layers) - 1
    layer = model.model.layers[last]
    a = arch.for_layer(last)
    assert a.moe and a.experts == 4 and a.top_k == 2
    names = [n.format(e=e, w=w) for e in range(4)
             for w in ROLE_NAMES.get(family, ("gate_proj", "up_proj", "down_proj")) for n in [EXPERT_NAMES[family]]]
    assert list(a.expert_linears()) == names
    nn_linears = {n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(a.linears) == nn_linears | set(names)
    ex = arch.family.experts
    fused = {k: v for k, v in layer.state_dict().items() if k.startswith(ex.module + ".")}
    per = expert_layout.split(ex, fused)
    assert {k: v.shape for k, v in expert_layout.fuse(ex, per, 4).items()} == {k: v.shape for k, v in fused.items()}
    assert all(torch.equal(expert_layout.fuse(ex, per, 4)[k], fused[k]) for k in fused)
    weights = a.weights(layer)
    assert all(tuple(weights[n].shape) == a.linear_shapes()[n] for n in a.linears)
    # the Hub layout (transformers' save_pretrained) read back by our reader as the module's state dict
    ck = Checkpoint(str(moe_checkpoints(family)))
    block, _ = ck.read_block(last)
    if family != "gpt_oss":  # gpt-oss's Hub checkpoints hold fused experts
        assert any(n.startswith(names[0]) for n in block), sorted(block)[:8]
    module = a.to_module(block)
    assert module.keys() == layer.state_dict().keys()
    assert all(torch.equal(module[k], v) for k, v in layer.state_dict().items())
    if family == "deepseek_v3":
        assert arch.layer_kinds == ("dense", "moe") and not arch.for_layer(0).moe
        assert set(arch.for_layer(0).linears) == {n for n, m in model.model.layers[0].named_modules()
                                                  if isinstance(m, torch.nn.Linear)}


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_expert_group_computes_transformers_experts(family):
    """Each expert of an ExpertGroup (2-D linears, transformers' own gate function) on every token
    gives what transformers' fused experts module gives when the router sends it every token."""
    model = tiny_family_model(family)
    layer, x, kw, last = _layer_inputs(model, n=2)
    arch = BlockArch.from_config(model.config).for_layer(last)
    ex = arch.family.experts
    experts = layer.get_submodule(ex.module)
    h = torch.randn(2, 3 * WINDOW, arch.hidden)
    group = ExpertGroup(experts, ex, [1, 3], expert_layout.split(
        ex, {k: v for k, v in layer.state_dict().items() if k.startswith(ex.module + ".")}))
    with torch.no_grad():
        ours = group(h)
        for j, e in enumerate([1, 3]):
            flat = h.reshape(-1, arch.hidden)
            index = torch.full((flat.shape[0], 1), e)
            theirs = experts(flat, index, torch.ones(flat.shape[0], 1))
            assert _rel(ours[..., j, :].reshape(-1, arch.hidden), theirs) < 1e-5, (family, e)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_let_pairs_are_exact_on_moe_blocks(family):
    """The attention's pairs (DeepSeek's three MLA norm pairs; its dense layer's MLP pairs too) leave
    each layer's FP output unchanged, and so does each expert's up -> down pair in an ExpertGroup."""
    model = tiny_family_model(family)
    arch = BlockArch.from_config(model.config)
    x, inputs = capture_layer_inputs(model, _ids(2, 3 * WINDOW))
    torch.manual_seed(1)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            a = arch.for_layer(i)
            init = {p.name: torch.rand(p.shape) * 2 + 0.25 for p in a.let_pairs}
            let = LET(a, init, down=True)
            assert let.pairs, (family, i)
            sd = dict(layer.state_dict())
            ref = block_forward(layer, x, inputs[i])
            assert _rel(block_forward(layer, x, inputs[i], let.transform(sd)), ref) < 1e-5, (family, i)
            x = ref
        a = arch.for_layer(len(model.model.layers) - 1)
        ex = a.family.experts
        unit = group_unit(a, [0, 2], routed_only=False)
        assert [p.name for p in unit.let_pairs] == (["down_0", "down_2"] if ex.down_pair else [])
        if unit.let_pairs:
            group = ExpertGroup(layer.get_submodule(ex.module), ex, [0, 2], expert_layout.split(
                ex, {k: v for k, v in layer.state_dict().items() if k.startswith(ex.module + ".")}))
            let = LET(unit, {p.name: torch.rand(p.shape) + 0.5 for p in unit.let_pairs}, down=True)
            h = torch.randn(2, 5, a.hidden)
            sd = dict(group.state_dict())
            assert _rel(block_forward(group, h, {}, let.transform(sd)), group(h)) < 1e-5


# ---------------------------------------------------------------------------------------- all-expert calibration
def _starved(model):
    """DeepSeek's router with expert 3 kept out of every token's choice (its score correction bias)."""
    layer = model.model.layers[-1]
    with torch.no_grad():
        layer.mlp.gate.e_score_correction_bias[3] = -10.0
    return model


def test_all_expert_calibration_gives_starved_experts_data_and_keeps_the_routed_output():
    """An expert the router never chooses: routed-only calibration has no token for it (rounded to
    nearest even with no threshold, and named), all-expert calibration gives it every token (GPTQ's
    weights from all of the MLP's inputs, better than RTN on them). The
    routed combination is untouched: the layer's FP output and its routing are the model's own, and
    the block output with the calibrated weights is what the model's own layer computes with them."""
    model = _starved(tiny_family_model("deepseek_v3"))
    layer, x, kw, last = _layer_inputs(model)
    arch = BlockArch.from_config(model.config).for_layer(last)
    targets = forward_all(layer, x, kw, 2)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    xs, top = mlp_inputs(layer, arch, x, kw, 2, None)
    assert not (top == 3).any() and (top == 0).any()
    runs = {}
    for routed_only, floor in ((True, 0.0), (True, 0.005), (False, 0.005)):
        cfg = CalibConfig(method="gptq", wbits=3, group_size=16, batch_size=2, routed_only=routed_only,
                          expert_min_tokens=floor)
        runs[routed_only, floor] = calibrate_block(layer, kw, x, targets, arch, cfg, last, fp_inputs=x)
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())  # the layer is left unchanged
    assert torch.equal(forward_all(layer, x, kw, 2), targets)
    routed, fallback, every = runs[True, 0.0], runs[True, 0.005], runs[False, 0.005]
    assert every.moe["routed_tokens"][3] == 0 and every.moe["rtn_fallback"] == [3] == fallback.moe["rtn_fallback"]
    assert routed.moe["rtn_fallback"] == [3] and not routed.moe["all_experts"]
    name = "mlp.experts.3.gate_proj"
    w = arch.weights(layer)[name]
    assert torch.equal(routed.linears[name].codes, every.linears[name].codes)  # RTN, from no data
    # every expert on every token: GPTQ on all of the MLP's inputs beats rounding to nearest there
    cfg = CalibConfig(method="gptq", wbits=3, group_size=16, batch_size=2, expert_min_tokens=0.0)
    all_tokens = calibrate_block(layer, kw, x, targets, arch, cfg, last, fp_inputs=x)
    assert all_tokens.moe["rtn_fallback"] == [] and all_tokens.moe["all_experts"]
    h = xs.reshape(-1, arch.hidden)  # the MLP's inputs (on the quantized stream: here the FP one)
    err = {k: (h @ (q.weight() - w).T).pow(2).mean().item()
           for k, q in (("gptq", all_tokens.linears[name]), ("rtn", every.linears[name]))}
    assert err["gptq"] < 0.9 * err["rtn"], err
    # the block's output: the model's own routed layer with the calibrated weights swapped in
    ours = all_tokens
    with swapped(layer, arch, ((n, q.weight()) for n, q in ours.linears.items()), arch.to_module(dict(ours.tensors))):
        y = forward_all(layer, x, kw, 2)
        again = copy.deepcopy(model.model.layers[last])
    assert torch.equal(forward_all(again, x, kw, 2), y)
    assert abs(ours.loss_after - (y - targets).pow(2).mean().item()) <= 1e-6 * ours.loss_after


# ---------------------------------------------------------------------------------------- quantize, export, load
# (method, format, bits, symmetric): compressed-tensors (symmetric 4-bit) is what transformers 5.25 loads
# for experts (it dequantizes them into the fused parameters); GPTQ v1 is vLLM's (transformers' GPTQ
# loader replaces nn.Linear modules only and leaves fused experts uninitialised); gpt-oss: native only
MOE_RUNS = [("rtn", "gptq", 4, False), ("gptq", "compressed-tensors", 4, True), ("lsi", "gptq", 3, False)]


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_every_moe_family_quantizes_exports_and_loads(family, moe_checkpoints, tmp_path):
    """rtn, gptq and lsi through the calibrator class on every family, from the Hub layout; the
    experts written one linear per expert and role under the names vLLM and transformers read
    (Mixtral's block_sparse_moe.experts.E.w1), the router in full precision; compressed-tensors
    loads in a plain transformers call with our evaluator's logits; gpt-oss writes native only."""
    ck = moe_checkpoints(family)
    arch = Checkpoint(str(ck)).arch
    last = arch.num_layers - 1
    for method, fmt, bits, sym in MOE_RUNS:
        if family == "gpt_oss":
            fmt = "native"
        out = tmp_path / method
        stats = quantize_in_process(ck, out, method, fmt, bits, sym, expert_min_tokens=0.0)
        assert all(0 < s["rel_after"] < 1 for s in stats), (method, stats)
        moe = stats[last]["experts"]
        assert sum(moe["routed_tokens"]) == moe["tokens"] * arch.top_k and moe["rtn_fallback"] == []
        if method == "gptq":
            assert stats[last]["rel_after"] < stats[last]["rel_before"]
        names = set(load_file(out / "model.safetensors"))
        marker = formats.get(fmt).MARKER
        for name in arch.for_layer(last).linears:
            assert f"model.layers.{last}.{name}{marker}" in names, (method, name)
        assert f"model.layers.{last}.{ROUTERS[family]}.weight" in names  # the router, in full precision
        assert not any(n.endswith(("gate_up_proj", "down_proj")) for n in names)  # no fused experts written
        if fmt == "compressed-tensors":
            qc = json.loads((out / "config.json").read_text())["quantization_config"]
            assert qc["ignore"][0] == "lm_head" and "gate" in qc["ignore"][1]
            _loads_like_ours(out, 1e-4)
        else:
            ours, _ = load_quantized(str(out))
            assert torch.isfinite(ours(input_ids=_ids(1, 8)).logits).all()
    if family == "gpt_oss":
        with pytest.raises(ValueError, match="cannot hold gpt_oss models.*use --format native"):
            formats.check("gptq", CalibConfig(wbits=4).spec, 16, arch)


# ---------------------------------------------------------------------------------------- data-parallel workers
@pytest.mark.parametrize("method,lowrank", [("gptq", None), ("lsi", "qera")])
def test_workers_share_the_experts_out_and_give_one_workers_bytes(method, lowrank):
    """Two data-parallel workers (threads, collectives by shared memory as in test_parallel) each hold
    half of the samples' MLP inputs: they gather them, calibrate the units they own (DeepSeek's
    shared experts and two groups of two experts), and broadcast the results. Every expert's codes,
    grids, low-rank factors and biases are the single worker's, bit for bit."""
    from lsiq.moe import calibrate_mlp
    from tests.test_parallel import ThreadCollective

    model = tiny_family_model("deepseek_v3")
    layer, x, kw, last = _layer_inputs(model, n=4)
    arch = BlockArch.from_config(model.config).for_layer(last)
    xs, top = mlp_inputs(layer, arch, x, kw, 2, None)
    cfg = CalibConfig(method=method, wbits=3, group_size=16, epochs=1, batch_size=2, expert_group=2,
                      expert_min_tokens=0.0, lowrank=lowrank, rank=4)
    one = calibrate_mlp(copy.deepcopy(layer), arch, cfg, xs, top, SampleShard.whole(4), last)
    coll, two, errors = ThreadCollective(2), [None, None], []

    def work(rank):
        try:
            owned = shard_range(4, 2, rank)
            shard = SampleShard(owned, 4, coll.reducer(rank), rank=rank, world=2, broadcast=coll.broadcaster(rank))
            two[rank] = calibrate_mlp(copy.deepcopy(layer), arch, cfg, xs[owned], top[owned], shard, last)
        except Exception as e:  # noqa: BLE001
            errors.append(e)
            coll.barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert one.moe["units"] == two[0].moe["units"] == ["shared experts", "experts 0-1", "experts 2-3"]
    assert sorted(set(two[0].moe["owners"])) == [0, 1]  # the units were shared out
    for res in two:
        assert res.linears.keys() == one.linears.keys() and res.tensors.keys() == one.tensors.keys()
        for name, q in one.linears.items():
            r = res.linears[name]
            assert torch.equal(q.codes, r.codes) and torch.equal(q.scale, r.scale) and torch.equal(q.zero, r.zero), name
            if lowrank:
                assert torch.equal(q.lowrank_a, r.lowrank_a) and torch.equal(q.lowrank_b, r.lowrank_b), name
        assert all(torch.equal(one.tensors[k], res.tensors[k]) for k in one.tensors)
        assert res.trainable_params == one.trainable_params and res.moe["routed_tokens"] == one.moe["routed_tokens"]


# ---------------------------------------------------------------------------------------- through the Ray pipeline
def test_deepseek_v3_through_the_ray_pipeline_with_two_workers(moe_checkpoints, texts_dir, tmp_path, ray_local):
    """LSI through pipeline.quantize's driver on DeepSeek-V3 (a dense first block, then a routed one
    with a shared expert and multi-head latent attention) with two calibrator actors that share the
    experts out: a symmetric 4-bit compressed-tensors output that transformers loads with our
    evaluator's logits; the report and the progress line carry each expert's routed tokens."""
    from pipeline.config import QuantizeConfig
    from pipeline.driver import run

    ck = moe_checkpoints("deepseek_v3")
    calib = CalibConfig(method="lsi", wbits=4, sym=True, group_size=32, epochs=2, batch_size=2, lsi_block_k=4,
                        expert_group=1, expert_min_tokens=0.45)
    lines: list[str] = []
    cfg = QuantizeConfig(model=str(ck), output=str(tmp_path / "out"), calib=[str(texts_dir / "calib.txt")],
                         calib_cfg=calib, nsamples=4, seqlen=32, workers=2, cpus_per_worker=1,
                         report=str(tmp_path / "report.json"))
    report = run(cfg, log=lines.append)
    assert report["format"] == "compressed-tensors" and report["workers"] == 2 and len(report["blocks"]) == 2
    dense, routed = report["blocks"]
    assert "experts" not in dense
    moe = routed["experts"]
    assert sorted(set(moe["owners"])) == [0, 1] and sum(moe["routed_tokens"]) == 4 * 32 * 2
    low = [e for e, n in enumerate(moe["routed_tokens"]) if n < 0.45 * 4 * 32]
    assert moe["rtn_fallback"] == low and low  # this seed's router sends expert 1 50 of 128 tokens: rounded to nearest
    assert moe["units"] == ["shared experts"] + [f"experts {e}-{e}" for e in range(4) if e not in low]
    block_line = next(line for line in lines if line.startswith("block 2/2"))
    assert "RTN for experts under 45% of the tokens" in block_line, block_line
    assert json.loads((tmp_path / "report.json").read_text())["blocks"][1]["experts"]["routed_tokens"] == moe["routed_tokens"]
    _loads_like_ours(tmp_path / "out", 1e-4)


@pytest.mark.parametrize("family,method,fmt", [("mixtral", "rtn", "gptq"), ("gpt_oss", "gptq", "native")])
def test_moe_family_through_the_ray_pipeline(family, method, fmt, moe_checkpoints, texts_dir, tmp_path, ray_local):
    """The families no other test runs through Ray (DeepSeek-V3 above, Qwen3-MoE below): pipeline.quantize's
    driver with one calibrator actor writes every expert's linears under the checkpoint names and
    the router in full precision; our loader reads the experts back into transformers' fused
    parameters, each within W4's rounding of the source's."""
    from transformers import AutoModelForCausalLM

    from pipeline.config import QuantizeConfig
    from pipeline.driver import run

    ck = moe_checkpoints(family)
    calib = CalibConfig(method=method, wbits=4, group_size=16, batch_size=2, expert_min_tokens=0.0)
    cfg = QuantizeConfig(model=str(ck), output=str(tmp_path / "out"), calib=[str(texts_dir / "calib.txt")],
                         calib_cfg=calib, nsamples=4, seqlen=32, format=fmt)
    report = run(cfg, log=lambda m: None)
    assert report["format"] == fmt and len(report["blocks"]) == 2
    assert all(b["experts"]["rtn_fallback"] == [] and b["experts"]["all_experts"] for b in report["blocks"])
    assert all(0 < b["rel_after"] < 1 for b in report["blocks"])
    names: set[str] = set()
    for shard in (tmp_path / "out").glob("*.safetensors"):
        names |= set(load_file(shard))
    arch = Checkpoint(str(ck)).arch
    marker = formats.get(fmt).MARKER
    assert all(f"model.layers.1.{n}{marker}" in names for n in arch.for_layer(1).linears)
    assert f"model.layers.1.{ROUTERS[family]}.weight" in names
    ours, _ = load_quantized(str(tmp_path / "out"))
    src = AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32).state_dict()
    fused = {k: v for k, v in ours.state_dict().items() if ".experts." in k and v.dim() == 3}
    assert fused, "no fused expert parameters"
    for k, v in fused.items():
        assert 0 < _rel(v, src[k]) < 0.2, k
    assert torch.isfinite(ours(input_ids=_ids(1, 8)).logits).all()


# ---------------------------------------------------------------------------------------- kill -9 and resume
def test_qwen3_moe_killed_with_sigkill_resumes_byte_identical(smollm2_dir, texts_dir, tmp_path, ray_local):
    """pipeline.quantize on a 10-layer Qwen3-MoE (GPTQ, every expert calibrated on all tokens, groups of
    two experts) killed with SIGKILL, with its embedded Ray, after its second block: the same
    command resumes after the blocks it finished (the last one replayed for the next block's
    inputs) and writes the bytes of an uninterrupted run. The killed run is a process of its own;
    the uninterrupted and the resumed ones run in this process on the session's Ray."""
    from pipeline.config import parse_quantize_args
    from pipeline.driver import run

    ck = copy_tokenizer(write_hub_checkpoint(tiny_family_model("qwen3_moe", layers=10), tmp_path / "ck"), smollm2_dir)

    def argv(out: Path) -> list[str]:
        return ["--model", str(ck), "--output", str(out), "--calib", str(texts_dir / "calib.txt"), "--method", "gptq",
                "--wbits", "4", "--group-size", "16", "--nsamples", "4", "--seqlen", "32", "--expert-group", "2",
                "--num-cpus", "1"]

    part, full = tmp_path / "part", tmp_path / "full"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.quantize", *argv(part)], stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        for line in proc.stderr:
            if line.startswith("block 2/10"):  # eight blocks of about 0.1 s each left: the kill lands midway
                os.killpg(proc.pid, signal.SIGKILL)  # the job and its embedded Ray die at once
                break
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL and not (part / MANIFEST).exists()
    done = len(list((part / "checkpoints").glob("block-*.json")))
    assert 2 <= done < 10
    run(parse_quantize_args(argv(full)))
    logs: list[str] = []
    report = run(parse_quantize_args(argv(part)), log=logs.append)
    assert report["resumed_blocks"] == done and f"block {done}/10  replayed" in "\n".join(logs)
    assert all(b["experts"]["all_experts"] and b["experts"]["units"] == ["experts 0-1", "experts 2-3"]
               for b in report["blocks"][done:])
    names = sorted(str(p.relative_to(full)) for p in full.rglob("*") if p.is_file())
    assert names == sorted(str(p.relative_to(part)) for p in part.rglob("*") if p.is_file())
    for name in names:
        if not name.startswith("checkpoints/"):  # records hold timings
            assert (full / name).read_bytes() == (part / name).read_bytes(), name
