"""Every dense family on tiny random models (transformers' own classes, hidden 64, 2 layers): the
descriptor against the module tree, LET's exactness on each family's pairs, per-layer inputs
beyond a sliding window, every family quantized (rtn, gptq, lsi) and exported in GPTQ v1 and
compressed-tensors with transformers loading it with our evaluator's logits, a Ray pipeline run
per family whose block differs from Llama's, the generic fallback, and clear refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from lsiq.archs import BlockArch, UnsupportedArchitecture, block_linears
from lsiq.capture import capture_layer_inputs
from lsiq.config import CalibConfig
from lsiq.evaluation import perplexity
from lsiq.forward import block_forward, forward_all
from lsiq.let import LET
from pipeline import formats
from pipeline.calibrator import BlockCalibrator
from pipeline.checkpoint import Checkpoint, CheckpointError
from pipeline.config import QuantizeConfig
from pipeline.model_io import MANIFEST, load_quantized, skeleton, with_tensors
from tests.conftest import FAMILIES, FAMILY_CONFIGS, WINDOW, copy_tokenizer, tiny_family_model, write_sharded_checkpoint

ALL_PAIRS = ["qkv", "fc1", "out", "qk", "down"]
EXPECTED_PAIRS = {
    "llama": ALL_PAIRS, "mistral": ALL_PAIRS, "qwen2": ALL_PAIRS, "gemma2": ALL_PAIRS, "phi3": ALL_PAIRS,
    "qwen3": ["qkv", "fc1", "out", "down"],  # per-head q/k norms: no rotary pair
    "gemma3_text": ["qkv", "fc1", "out", "down"],
    "olmo2": ["out", "down"],  # post-norms only, q/k norms over the whole projection
}
SLIDING = ("mistral", "qwen2", "gemma2", "gemma3_text")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _ids(n: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 1000, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def family_checkpoints(tmp_path_factory, smollm2_dir):
    """``get(family) -> checkpoint dir``: a tiny random checkpoint per family (sharded, with SmolLM2's
    tokenizer), written on first use."""
    done: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in done:
            model = tiny_family_model(family)
            done[family] = copy_tokenizer(write_sharded_checkpoint(model, tmp_path_factory.mktemp(family) / "model"),
                                          smollm2_dir)
        return done[family]

    return get


# ---------------------------------------------------------------------------------------- descriptors
@pytest.mark.parametrize("family", FAMILIES)
def test_descriptor_matches_the_module_tree(family):
    """The descriptor's linears are the layer's nn.Linears (Phi-3's fused ones included), with the
    shapes the config implies; the same from the shapes alone (the planner's path)."""
    config = FAMILY_CONFIGS[family]()
    model = AutoModelForCausalLM.from_config(config)
    arch = BlockArch.from_config(config)
    layer = model.model.layers[0]
    assert set(arch.linears) == set(block_linears(layer))
    assert arch.linear_shapes() == {n: tuple(layer.get_submodule(n).weight.shape) for n in arch.linears}
    assert all(n in dict(layer.named_modules()) for n in arch.norms)
    assert [p.name for p in arch.let_pairs] == EXPECTED_PAIRS[family]
    assert [n for g in arch.input_groups for n in g] == list(arch.linears)
    again = BlockArch(arch.model_type, arch.hidden, arch.intermediate, arch.n_heads, arch.n_kv_heads, arch.head_dim,
                      arch.num_layers, rotary_dim=arch.rotary_dim)
    assert again.linear_shapes() == arch.linear_shapes() and again.let_pairs == arch.let_pairs
    assert arch.unpaired == ""
    if family == "phi3":
        assert arch.linears == ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
        assert arch.rotary_dim == 8 and arch.role_rows("v").start == 64 + 32  # v follows q and k in qkv_proj


@pytest.mark.parametrize("family", FAMILIES)
def test_let_pairs_are_exact(family):
    """Random LET scales on every pair of the family (each alone and all together) leave the FP
    output of both layers (each with its own mask and rotary embeddings) unchanged, and each pair
    does move weights: Gemma's (1 + w) norms, Phi-3's row ranges, GQA, biases, partial rotary."""
    model = tiny_family_model(family)
    arch = BlockArch.from_config(model.config)
    x, inputs = capture_layer_inputs(model, _ids(2, 3 * WINDOW))
    torch.manual_seed(1)
    init = {p.name: torch.rand(p.shape) * 2 + 0.25 for p in arch.let_pairs}
    let = LET(arch, init, down=True)
    assert [p.name for p in let.pairs] == EXPECTED_PAIRS[family]
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            sd = dict(layer.state_dict())
            ref = block_forward(layer, x, inputs[i])
            assert _rel(block_forward(layer, x, inputs[i], let.transform(sd)), ref) < 1e-5, i
            for pair in let.pairs:
                t = dict(sd)
                pair.apply(t, init[pair.name])
                assert any(not torch.equal(t[k], sd[k]) for k in sd), pair.name
                assert _rel(block_forward(layer, x, inputs[i], t), ref) < 1e-5, (i, pair.name)


def test_gemma_norm_offset_is_what_keeps_let_exact():
    """The fold w' = (1 + w) / s - 1 matters: the Llama fold w / s on a Gemma norm changes the output."""
    model = tiny_family_model("gemma3_text")
    arch = BlockArch.from_config(model.config)
    pair = next(p for p in arch.let_pairs if p.name == "qkv")
    assert pair.offset == 1.0
    x, inputs = capture_layer_inputs(model, _ids(2, 16))
    layer = model.model.layers[0]
    sd = dict(layer.state_dict())
    s = torch.rand(pair.shape) + 0.5
    right, wrong = dict(sd), dict(sd)
    pair.apply(right, s)
    type(pair)(pair.name, pair.norm, pair.linears, pair.width, 0.0).apply(wrong, s)
    with torch.no_grad():
        ref = block_forward(layer, x, inputs[0])
        assert _rel(block_forward(layer, x, inputs[0], right), ref) < 1e-5
        assert _rel(block_forward(layer, x, inputs[0], wrong), ref) > 1e-2


# ---------------------------------------------------------------------------------------- per-layer inputs
@pytest.mark.parametrize("family", SLIDING)
def test_blocks_beyond_the_sliding_window_match_the_models_forward(family):
    """At a sequence length of 3 windows, running each block on its own captured inputs, in
    micro-batches of one sample, gives the block outputs of the model's own forward; the inputs do
    matter (a full-attention mask, or layer 0's inputs for every layer, give other outputs)."""
    model = tiny_family_model(family)
    ids = _ids(3, 3 * WINDOW, seed=2)
    outs: dict[int, torch.Tensor] = {}
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o[0] if isinstance(o, tuple) else o))
               for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    x, inputs = capture_layer_inputs(with_tensors(skeleton(model.config), dict(model.state_dict())), ids)
    types = getattr(model.config, "layer_types", None)
    assert inputs.types == (tuple(types) if types else ("all", "all"))
    for i, layer in enumerate(model.model.layers):
        y = forward_all(layer, x, inputs[i], batch_size=1)
        assert _rel(y, outs[i]) < 1e-5, i
        kw = inputs[i]
        if kw.get("attention_mask") is not None:  # a sliding layer: the window is in its mask
            full = forward_all(layer, x, {**kw, "attention_mask": None} if model.config._attn_implementation == "sdpa"
                               else {**kw, "attention_mask": inputs[1 - i]["attention_mask"]}, batch_size=1)
            assert _rel(full, outs[i]) > 1e-4, i
        if inputs.types[0] != inputs.types[1] and i == 1:  # the old way: layer 0's inputs for every layer
            assert _rel(forward_all(layer, x, inputs[0], batch_size=1), outs[i]) > 1e-4
        x = outs[i]
    # the calibrator itself (a fresh config from the checkpoint's dict, as in a Ray actor): its FP
    # stream after each block is the model's own block output
    cal = BlockCalibrator(model.config.to_dict(), CalibConfig(method="rtn", wbits=4, group_size=16, forward_batch_size=1))
    cal.set_inputs(capture_layer_inputs(model, ids))
    state = model.state_dict()
    for i in range(len(model.model.layers)):
        block = {k[len(f"model.layers.{i}."):]: v for k, v in state.items() if k.startswith(f"model.layers.{i}.")}
        cal.calibrate(i, block, {"bytes_read": 0, "read_seconds": 0.0, "peak_rss_reader": 0, "fingerprint": ""})
        assert _rel(cal.fp_in, outs[i]) < 1e-5, i


def test_capture_in_chunks_gives_what_one_pass_gives():
    """The samples go through the capture a few at a time (masks are built per batch): the same
    hidden states and per-layer inputs bit for bit, masks with a batch dimension of one."""
    model = tiny_family_model("gemma2")  # eager: both layer types get a float mask
    ids = _ids(5, 3 * WINDOW, seed=4)
    x1, in1 = capture_layer_inputs(model, ids, chunk=8)
    x2, in2 = capture_layer_inputs(model, ids, chunk=2)
    assert torch.equal(x1, x2) and in1.types == in2.types == ("sliding_attention", "full_attention")
    for t in in1.kwargs:
        assert in1.kwargs[t].keys() == in2.kwargs[t].keys()
        assert in1.kwargs[t]["attention_mask"].shape == (1, 1, 3 * WINDOW, 3 * WINDOW)
        assert torch.equal(in1.kwargs[t]["attention_mask"], in2.kwargs[t]["attention_mask"])
    assert not torch.equal(in1[0]["attention_mask"], in1[1]["attention_mask"])


# ---------------------------------------------------------------------------------------- quantize, export, load
def quantize_in_process(ck: Path | str, out: Path, method: str, fmt: str, wbits: int, sym: bool = False,
                        storage_options: dict | None = None, **calib) -> list[dict]:
    """The pipeline's per-block path without Ray: the reader's Checkpoint (``ck``: a path or a URL read
    with ``storage_options``), every layer type's captured inputs, the calibrator class the Ray actor
    runs (its stored tensors feed the next block), the format's tensors, config.json with
    quantization_config and our manifest. ``calib``: more CalibConfig settings. Returns the blocks' stats."""
    ckpt = Checkpoint(str(ck), storage_options)
    settings = dict(method=method, wbits=wbits, group_size=16, sym=sym, steps=4, batch_size=2, lsi_block_k=4) | calib
    cfg = QuantizeConfig(model=str(ck), output=str(out), calib=["-"], nsamples=4, seqlen=3 * WINDOW, format=fmt,
                         calib_cfg=CalibConfig(**settings))
    other = ckpt.read(ckpt.other_names())
    hidden, inputs = capture_layer_inputs(with_tensors(skeleton(ckpt.config), dict(other)), _ids(4, 3 * WINDOW, 3))
    cal = BlockCalibrator(ckpt.model_config_dict, cfg.calib_cfg, fmt=fmt)
    cal.set_inputs((hidden, inputs))
    tensors, stats = dict(other), []
    for i in range(ckpt.arch.num_layers):
        block, fingerprint = ckpt.read_block(i)
        res = cal.calibrate(i, block, {"bytes_read": 0, "read_seconds": 0.0, "peak_rss_reader": 0,
                                       "fingerprint": fingerprint})
        tensors.update(res["tensors"])
        stats.append(res["stats"])
    out.mkdir(parents=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    module, c = formats.get(fmt), cfg.calib_cfg
    qconfig = formats.quantization_config(fmt, c.spec, ckpt.arch)
    (out / "config.json").write_text(json.dumps(ckpt.model_config_dict | ({"quantization_config": qconfig} if qconfig else {})))
    (out / MANIFEST).write_text(json.dumps({"status": "complete", "format": module.FORMAT, "quantization": {
        "method": method, "wbits": wbits, "abits": 16, "group_size": c.group_size, "sym": sym, "zero_min": c.zero_min}}))
    return stats


def _loads_like_ours(out: Path, tol: float) -> None:
    """transformers' plain from_pretrained computes our evaluator's logits and perplexity."""
    ours, _ = load_quantized(str(out))
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, device_map="cpu").eval()
    ids = _ids(2, 3 * WINDOW, seed=5)
    with torch.no_grad():
        a, b = ours(input_ids=ids).logits, theirs(input_ids=ids).logits.float()
    assert ((a - b).abs().max() / a.abs().max()).item() < tol
    assert perplexity(theirs, ids) == pytest.approx(perplexity(ours, ids), rel=tol)


# (method, format, bits, symmetric, loaded by transformers too): GPTQ v1 for the asymmetric grids,
# compressed-tensors for symmetric 4-bit; each format is loaded by transformers once per family
RUNS = [("rtn", "gptq", 4, False, True), ("gptq", "compressed-tensors", 4, True, True), ("lsi", "gptq", 3, False, False)]
# the families whose block differs from Llama's most run lsi through the Ray pipeline instead (below;
# Llama's own: tests/test_pipeline.py)
RAY_LSI = ("llama", "qwen3", "gemma3_text", "phi3")


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_quantizes_exports_and_loads(family, family_checkpoints, tmp_path):
    """rtn, gptq and lsi on every family; each export (GPTQ v1 and compressed-tensors, with the
    family's own module names) loads in a plain transformers call with our evaluator's logits."""
    import gptqmodel  # noqa: F401 - transformers' GPTQ support needs it (CPU kernels)

    ck = family_checkpoints(family)
    for method, fmt, bits, sym, theirs in RUNS:
        if method == "lsi" and family in RAY_LSI:
            continue
        out = tmp_path / method
        stats = quantize_in_process(ck, out, method, fmt, bits, sym)
        assert all(0 < s["rel_after"] < 1 for s in stats), (method, stats)
        if method == "gptq":
            assert all(s["rel_after"] < s["rel_before"] for s in stats)
        names = set(load_file(out / "model.safetensors"))
        marker = formats.get(fmt).MARKER
        for linear in BlockArch.from_config(Checkpoint(str(ck)).config).linears:
            assert f"model.layers.1.{linear}{marker}" in names, (method, linear)
        if theirs:
            _loads_like_ours(out, 2e-3 if fmt == "gptq" else 1e-5)
        else:  # our evaluator reads what transformers read in the rtn run, in the same layout
            ours, _ = load_quantized(str(out))
            assert torch.isfinite(ours(input_ids=_ids(1, 8)).logits).all()


@pytest.mark.parametrize("family", [f for f in RAY_LSI if f != "llama"])
def test_family_through_the_ray_pipeline(family, family_checkpoints, texts_dir, tmp_path, ray_local):
    """LSI through pipeline.quantize's driver (Ray actors, per-layer inputs shipped to the
    calibrator) on Qwen3 (q/k norms), Gemma 3 (sliding and global layers, (1 + w) norms) and Phi-3
    (fused linears, partial rotary): GPTQ v1 that transformers loads with our logits; the norms no
    LET pair folds carried unchanged, the others folded."""
    import gptqmodel  # noqa: F401

    from pipeline.driver import run
    from tests.test_pipeline import _cfg

    ck = family_checkpoints(family)
    out = tmp_path / "out"
    cfg = _cfg(ck, out, texts_dir / "calib.txt", method="lsi")  # 2 epochs of 2 samples per step
    report = run(cfg, log=lambda m: None)
    assert report["format"] == "gptq" and len(report["blocks"]) == 2
    assert sum(b["rel_after"] for b in report["blocks"]) < sum(b["rel_before"] for b in report["blocks"])
    ours, _ = load_quantized(str(out))
    src = Checkpoint(str(ck))
    arch = src.arch
    folded = {p.norm for p in arch.let_pairs if hasattr(p, "norm")}
    for norm in arch.norms:
        name = f"model.layers.1.{norm}.weight"
        same = torch.equal(ours.state_dict()[name], src.read([name])[name])
        assert same == (norm not in folded), name
    _loads_like_ours(out, 2e-3)


# ---------------------------------------------------------------------------------------- fallback and refusals
def _tiny_generic_config():
    from transformers import Starcoder2Config

    return Starcoder2Config(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                            num_hidden_layers=2, vocab_size=49152, max_position_embeddings=256)


def test_generic_fallback_quantizes_every_linear_without_pairs(tmp_path):
    """A model_type with no descriptor (Starcoder2: c_fc / c_proj, LayerNorms with biases): every
    nn.Linear of its decoder layer is found and quantized, LET has nothing to pair (said, with what
    was not paired), and the LET-based methods still run and export."""
    model = AutoModelForCausalLM.from_config(_tiny_generic_config()).eval()
    arch = BlockArch.from_config(model.config)
    assert arch.name == "generic" and arch.let_pairs == () and arch.let_parameters(down=True) == 0
    assert set(arch.linears) == set(block_linears(model.model.layers[0])) and "mlp.c_fc" in arch.linears
    assert "no family descriptor" in arch.unpaired and "mlp.c_fc" in arch.unpaired and "v -> o" in arch.unpaired
    ck = write_sharded_checkpoint(model, tmp_path / "model")
    lsi = quantize_in_process(ck, tmp_path / "lsi", "lsi", "gptq", 4)  # LET with nothing to pair, LWC, LSI
    assert len(lsi) == 2 and all(0 < s["rel_after"] < 1 for s in lsi) and all(s["trainable_params"] > 0 for s in lsi)
    gptq = quantize_in_process(ck, tmp_path / "gptq", "gptq", "gptq", 4)  # one Hessian per linear
    assert all(s["rel_after"] < s["rel_before"] for s in gptq)
    ours, _ = load_quantized(str(tmp_path / "gptq"))
    assert ours(input_ids=_ids(1, 8)).logits.isfinite().all()


@pytest.mark.parametrize("config,match", [
    ("qwen2_moe", "weights outside nn.Linear modules.*mlp.experts"),  # no descriptor: the fallback says why not
    ("gpt2", "no model.layers ModuleList"),
    ("gemma3", "multimodal checkpoint"),
])
def test_what_we_cannot_do_is_refused_with_what_is_missing(config, match):
    from transformers import AutoConfig

    small = {"qwen2_moe": dict(num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=32),
             "gpt2": {}, "gemma3": {}}[config]
    base = {} if config in ("gpt2", "gemma3") else dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                                        num_key_value_heads=2, num_hidden_layers=2, vocab_size=256)
    with pytest.raises(UnsupportedArchitecture, match=match):
        BlockArch.from_config(AutoConfig.for_model(config, **base, **small))


@pytest.mark.parametrize("family,name", [("olmo2", "post_feedforward_layernorm.weight"),
                                         ("phi3", "self_attn.qkv_proj.weight"),
                                         ("qwen3", "self_attn.k_norm.weight")])
def test_a_checkpoint_missing_a_tensor_of_its_family_is_refused(family, name, family_checkpoints, tmp_path):
    src = family_checkpoints(family)
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in src.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    key = f"model.layers.1.{name}"
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    shard = broken / index["weight_map"].pop(key)
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    tensors = load_file(shard)
    del tensors[key]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"missing tensor {key}"):
        Checkpoint(str(broken))
