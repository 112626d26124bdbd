"""Export formats: compressed-tensors, GPTQ v1 and native, checked against code no one here wrote.

- compressed-tensors: the package's own compressor packs the same tensors, and transformers (with
  the package) loads our output and computes our logits;
- GPTQ: an unpacker written from the AutoGPTQ layout description (not our packer run backwards),
  and transformers with gptqmodel's CPU kernels loading the output;
- vLLM (no GPU here): the names, shapes and dtypes its loaders allocate for a Llama model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lsiq.arch import BlockArch
from lsiq.config import CalibConfig
from lsiq.evaluation import perplexity
from lsiq.quantizer import QuantSpec, minmax_scale_zero, quantize_codes
from lsiq.results import BlockResult, QuantizedLinear
from pipeline import ct_format, formats, gptq_format
from pipeline.config import QuantizeConfig, parse_quantize_args
from pipeline.driver import run
from pipeline.model_io import MANIFEST, load_quantized, skeleton
from tests.conftest import LINEARS, tiny_llama_config


def _block(spec: QuantSpec, out_f: int = 64, in_f: int = 96, seed: int = 0) -> BlockResult:
    """A one-linear block with min-max codes of a random weight (every code value in use)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    w[0, : spec.group_len(in_f)] = torch.rand(spec.group_len(in_f), generator=g)  # a group with no negative weight
    scale, zero = minmax_scale_zero(w, spec)
    q = QuantizedLinear(quantize_codes(w, scale, zero, spec), scale, zero, spec)
    return BlockResult({"mlp.down_proj": q}, {"post_attention_layernorm.weight": torch.rand(8, generator=g)}, 0.0, 0.0)


SPECS = [QuantSpec(4, 32), QuantSpec(4, 0, sym=True), QuantSpec(8, 32, sym=True), QuantSpec(8, 0)]


ROUND_TRIPS = [(fmt, bits, group, sym) for fmt in formats.FORMATS
               for bits, group, sym in [(2, 32, False), (3, 32, False), (4, 32, True), (4, 0, False), (8, 32, False)]
               if bits in getattr(formats.get(fmt), "BITS", (bits,))]


@pytest.mark.parametrize("fmt,bits,group,sym", ROUND_TRIPS)
def test_round_trip_keeps_the_integer_form(fmt, bits, group, sym):
    spec = QuantSpec(bits, group, sym, zero_min=formats.zero_min(fmt, QuantSpec(bits, group, sym)))
    result = _block(spec)
    stored = formats.block_tensors(fmt, "model.layers.0.", result)
    linears, plain = formats.read_linears(fmt, stored, spec)
    q, back = result.linears["mlp.down_proj"], linears["model.layers.0.mlp.down_proj"]
    assert torch.equal(back.codes, q.codes) and torch.equal(back.zero, q.zero)
    want_scale = q.scale.half().float() if fmt == "gptq" else q.scale  # GPTQ stores float16 scales
    assert torch.equal(back.scale, want_scale)
    assert torch.equal(plain["model.layers.0.post_attention_layernorm.weight"],
                       result.tensors["post_attention_layernorm.weight"])


def test_gptq_refuses_a_zero_point_it_cannot_store():
    result = _block(QuantSpec(4, 32))  # zero_min 0: the all-positive group has zero point 0
    assert float(result.linears["mlp.down_proj"].zero.min()) == 0
    with pytest.raises(ValueError, match="zero point of 0 cannot be stored in GPTQ v1"):
        formats.block_tensors("gptq", "model.layers.0.", result)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_compressed_tensors_own_compressor_writes_the_same_tensors(spec):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    result = _block(spec)
    q = result.linears["mlp.down_proj"]
    ours = formats.block_tensors("compressed-tensors", "", result)
    scheme = QuantizationScheme.model_validate(ct_format.quantization_config(spec)["config_groups"]["group_0"])
    offset = 2 ** (spec.bits - 1)  # compressed-tensors keeps signed values: q = code - 2^(b-1)
    state = {"weight": q.dequantize(), "weight_scale": q.scale, "weight_zero_point": (q.zero - offset).to(torch.int8)}
    theirs = PackedQuantizationCompressor.compress(state, scheme)
    names = {k[len("mlp.down_proj."):] for k in ours if k.startswith("mlp.down_proj.")}
    assert names == set(theirs)
    for name in names:
        assert torch.equal(ours[f"mlp.down_proj.{name}"], theirs[name].to(ours[f"mlp.down_proj.{name}"].dtype)), name
    back = PackedQuantizationCompressor.decompress({k: ours[f"mlp.down_proj.{k}"] for k in names}, scheme)
    assert torch.equal(back["weight"], q.dequantize())


def _unpack_gptq_reference(words: np.ndarray, bits: int) -> np.ndarray:
    """GPTQ v1 unpacking from the layout description: int32 [rows, cols] packed along dim 0.
    2/4/8 bits: word r holds codes r*(32/b) + j at bits [b*j, b*j + b). 3 bits: 32 codes in 3 words;
    word 0 = codes 0-9 at bits 0, 3, ..., 27 and the low 2 bits of code 10 at 30-31; word 1 = bit 2
    of code 10 at bit 0, codes 11-20 at 1, 4, ..., 28 and the low bit of code 21 at 31; word 2 =
    bits 1-2 of code 21 at 0-1 and codes 22-31 at 2, 5, ..., 29."""
    w = words.astype(np.int64) & 0xFFFFFFFF
    rows, cols = w.shape
    mask = (1 << bits) - 1
    if bits in (2, 4, 8):
        per = 32 // bits
        out = np.stack([(w >> (bits * j)) & mask for j in range(per)], axis=1)
        return out.reshape(rows * per, cols)
    assert bits == 3 and rows % 3 == 0
    out = np.zeros((rows // 3 * 32, cols), dtype=np.int64)
    for t in range(rows // 3):
        w0, w1, w2 = w[3 * t], w[3 * t + 1], w[3 * t + 2]
        base = 32 * t
        for j in range(10):
            out[base + j] = (w0 >> (3 * j)) & 7
            out[base + 11 + j] = (w1 >> (3 * j + 1)) & 7
            out[base + 22 + j] = (w2 >> (3 * j + 2)) & 7
        out[base + 10] = ((w0 >> 30) & 3) | ((w1 & 1) << 2)
        out[base + 21] = ((w1 >> 31) & 1) | ((w2 & 3) << 1)
    return out


@pytest.mark.parametrize("bits,group,sym", [(2, 32, False), (3, 32, False), (3, 0, True), (4, 32, False), (8, 0, False)])
def test_gptq_packing_against_an_independent_unpacker(bits, group, sym):
    spec = QuantSpec(bits, group, sym, zero_min=gptq_format.zero_min(QuantSpec(bits, group, sym)))
    result = _block(spec, out_f=64, in_f=96)
    q = result.linears["mlp.down_proj"]
    t = formats.block_tensors("gptq", "x.", result)
    assert t["x.mlp.down_proj.qweight"].shape == (96 * bits // 32, 64)
    codes = _unpack_gptq_reference(t["x.mlp.down_proj.qweight"].numpy(), bits)  # [in, out]
    assert np.array_equal(codes, q.codes.t().numpy())
    zeros = _unpack_gptq_reference(t["x.mlp.down_proj.qzeros"].t().contiguous().numpy(), bits).T + 1  # stored zero - 1
    assert np.array_equal(zeros, q.zero.t().numpy())
    g_idx = t["x.mlp.down_proj.g_idx"].numpy()
    scales = t["x.mlp.down_proj.scales"].float().numpy()  # [groups, out]
    w = (codes - zeros[g_idx]) * scales[g_idx]  # AutoGPTQ's dequantization, per input row
    assert np.array_equal(w.T.astype(np.float32), formats.dequantize_tensors("gptq", t, spec)["x.mlp.down_proj.weight"].numpy())


def vllm_expected(fmt: str, spec: QuantSpec, out_f: int, in_f: int) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    """The parameters vLLM allocates for one linear at tensor-parallel size 1 (None = its params_dtype,
    any float the loader casts from), from its create_weights: compressed_tensors_wNa16.py
    (CompressedTensorsWNA16) for compressed-tensors, gptq.py / gptq_marlin.py for GPTQ."""
    groups = in_f // spec.group_size if spec.group_size else 1
    if fmt == "compressed-tensors":
        pack = 32 // spec.bits
        out = {"weight_packed": ((out_f, in_f // pack), torch.int32), "weight_scale": ((out_f, groups), None),
               "weight_shape": ((2,), torch.int64)}
        if not spec.sym:
            out["weight_zero_point"] = ((out_f // pack, groups), torch.int32)
        return out
    return {"qweight": ((in_f * spec.bits // 32, out_f), torch.int32), "qzeros": ((groups, out_f * spec.bits // 32), torch.int32),
            "scales": ((groups, out_f), torch.float16), "g_idx": ((in_f,), torch.int32)}


def check_vllm_layout(out: Path, fmt: str, spec: QuantSpec) -> None:
    """Every tensor of the output is one vLLM's Llama loader expects, with its shape and dtype."""
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    if fmt == "compressed-tensors":
        from compressed_tensors.quantization import QuantizationConfig

        parsed = QuantizationConfig.model_validate(qc)
        assert qc["quant_method"] == "compressed-tensors" and parsed.format == "pack-quantized"
        assert parsed.quantization_status == "compressed" and parsed.ignore == ["lm_head"]
        (scheme,) = parsed.config_groups.values()
        w = scheme.weights  # what vLLM's _is_wNa16_group_channel asks of a WNA16 scheme
        assert scheme.targets == ["Linear"] and scheme.input_activations is None
        assert w.num_bits in (4, 8) and w.type == "int" and not w.dynamic and w.actorder is None
        assert w.strategy == ("group" if spec.group_size else "channel") and w.symmetric == spec.sym
        assert (w.group_size or 0) == spec.group_size
    else:
        for key in ("bits", "group_size", "desc_act"):  # GPTQConfig.from_config's required keys
            assert key in qc
        assert qc["quant_method"] == "gptq" and qc["bits"] == spec.bits and qc["desc_act"] is False
        assert qc["group_size"] == (spec.group_size or -1) and qc["sym"] == spec.sym and qc["lm_head"] is False
        assert json.loads((out / "quantize_config.json").read_text()) == qc
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {}
    for f in sorted(set(index.values())):
        tensors.update(load_file(out / f))
    assert set(tensors) == set(index)
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(out)
    plain = {k for k in skeleton(cfg).state_dict() if not any(f".{n}.weight" in k for n in LINEARS)}
    expected = {}
    for i in range(cfg.num_hidden_layers):
        for name, (out_f, in_f) in BlockArch.from_config(cfg).linear_shapes().items():
            for suffix, want in vllm_expected(fmt, spec, out_f, in_f).items():
                expected[f"model.layers.{i}.{name}.{suffix}"] = want
    assert set(tensors) == set(expected) | plain
    for name, (shape, dtype) in expected.items():
        t = tensors[name]
        assert tuple(t.shape) == shape, name
        assert t.dtype == dtype if dtype is not None else t.is_floating_point(), name
    for name in plain:
        assert tensors[name].is_floating_point(), name


# asymmetric group-wise and symmetric per-channel compressed-tensors; 3-bit asymmetric GPTQ (symmetric
# GPTQ packing is covered by the unit tests above)
FORMAT_RUNS = [("compressed-tensors", 4, 32, False), ("compressed-tensors", 8, 0, True), ("gptq", 3, 32, False)]


@pytest.mark.parametrize("fmt,bits,group,sym", FORMAT_RUNS)
def test_pipeline_output_loads_in_transformers(tiny_checkpoint, texts_dir, tmp_path, ray_local, fmt, bits, group, sym):
    """The pipeline's output of each format: vLLM's layout, and transformers (with compressed-tensors
    or gptqmodel) computes the logits of our own dequantized model."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    out = tmp_path / "out"
    calib = CalibConfig(method="lsi", wbits=bits, group_size=group, sym=sym, epochs=1, batch_size=2, lsi_block_k=4,
                        lr_lsi=1e-3)
    cfg = QuantizeConfig(model=str(tiny_checkpoint), output=str(out), calib=[str(texts_dir / "calib.txt")],
                         calib_cfg=calib, nsamples=4, seqlen=32, format=fmt)
    report = run(cfg, log=lambda m: None)
    assert report["format"] == fmt
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["format"] == formats.get(fmt).FORMAT
    spec = cfg.calib_cfg.spec
    check_vllm_layout(out, fmt, spec)
    ours, _ = load_quantized(str(out))
    if fmt == "compressed-tensors":
        # dequantize=True: transformers' default (compressed) path cannot load asymmetric zero points
        # in this version (its meta-device compression leaves them unpacked); see docs/formats.md
        theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                      quantization_config=CompressedTensorsConfig(dequantize=True))
        weight = lambda m: m.weight  # noqa: E731
        rounding, tol = torch.float32, 1e-4
    else:
        import gptqmodel  # noqa: F401 - transformers' GPTQ support needs it (CPU kernels)

        theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, device_map="cpu")
        weight = lambda m: m.dequantize_weight().t()  # noqa: E731 - [out, in], computed in float16
        rounding, tol = torch.float16, 2e-3
    theirs.eval()
    for i, layer in enumerate(theirs.model.layers):
        for name in LINEARS:
            mine = ours.get_submodule(f"model.layers.{i}.{name}").weight
            assert torch.equal(weight(layer.get_submodule(name)).to(rounding), mine.to(rounding)), (i, name)
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(input_ids=ids).logits, theirs(input_ids=ids).logits.float()
    assert ((a - b).abs().max() / a.abs().max()).item() < tol
    assert perplexity(theirs, ids) == pytest.approx(perplexity(ours, ids), rel=tol)


def test_default_format_and_clear_errors(tiny_checkpoint, texts_dir, tmp_path):
    def cfg(*args):
        return parse_quantize_args(["--model", str(tiny_checkpoint), "--output", str(tmp_path / "q"),
                                    "--calib", str(texts_dir / "calib.txt"), *args])

    assert cfg("--wbits", "4").format == "gptq"  # asymmetric: what a plain from_pretrained loads
    assert cfg("--wbits", "4", "--sym").format == "compressed-tensors"
    assert cfg("--wbits", "8", "--sym").format == "compressed-tensors"
    assert cfg("--wbits", "3").format == "gptq" and cfg("--wbits", "3").calib_cfg.zero_min == 1
    assert cfg("--wbits", "3", "--sym").calib_cfg.zero_min == 0
    assert cfg("--wbits", "4", "--abits", "8").format == "native"
    assert cfg("--wbits", "6").format == "native"
    assert cfg("--wbits", "4", "--lowrank", "qera").format == "native"  # corrections live in native only
    arch = BlockArch.from_config(tiny_llama_config())
    with pytest.raises(ValueError, match="needs --format native"):
        formats.check("compressed-tensors", QuantSpec(4, 32), 8, arch)
    with pytest.raises(ValueError, match="4- and 8-bit weights"):
        formats.check("compressed-tensors", QuantSpec(3, 32), 16, arch)
    with pytest.raises(ValueError, match="2, 3, 4 and 8-bit"):
        formats.check("gptq", QuantSpec(5, 32, zero_min=1), 16, arch)
    with pytest.raises(ValueError, match="whole number of 32-bit words"):
        formats.check("gptq", QuantSpec(3, 0, sym=True), 16, BlockArch.from_config(tiny_llama_config(hidden_size=72)))
    # through the CLI: the error, and no output that looks complete
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "pipeline.quantize", "--model", str(tiny_checkpoint), "--output",
                        str(tmp_path / "bad"), "--calib", str(texts_dir / "calib.txt"), "--wbits", "3",
                        "--format", "compressed-tensors"], capture_output=True, text=True)
    assert r.returncode == 2 and "4- and 8-bit weights" in r.stderr
    assert not (tmp_path / "bad" / MANIFEST).exists()


def test_native_still_reads_its_own_layout():
    spec = QuantSpec(3, 32)
    result = _block(spec)
    t = formats.block_tensors("native", "p.", result)
    assert set(t) == {"p.mlp.down_proj.qweight", "p.mlp.down_proj.scales", "p.mlp.down_proj.qzeros",
                      "p.mlp.down_proj.weight_shape", "p.post_attention_layernorm.weight"}
    w = formats.dequantize_tensors("native", t, spec)["p.mlp.down_proj.weight"]
    assert torch.equal(w, result.linears["mlp.down_proj"].dequantize())
    assert math.isfinite(float(w.sum()))


def test_format_names_known_to_the_cli_are_the_formats():
    from pipeline.config import FORMAT_NAMES

    assert FORMAT_NAMES == formats.FORMATS
