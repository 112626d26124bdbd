"""FP8 source checkpoints (DeepSeek-V3's block-scaled layout and compressed-tensors' float-quantized
one) read as full precision, block by block: the same block tensors as the same model written in
float32, and the same quantized output; a tiny DeepSeek-V3 in DeepSeek's FP8 layout read from the S3
server quantizes like its bf16 write, within FP8's rounding."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.checkpoint import Checkpoint, CheckpointError
from pipeline.driver import run
from tests.conftest import copy_tokenizer, tiny_checkpoint_with_tokenizer, tiny_family_model, upload_dir, write_hub_checkpoint
from tests.test_pipeline import _cfg

E4M3_MAX = 448.0


def _fp8_tiles(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's weight quantization: one float32 scale per block (ragged edge tiles included),
    weight = float8_e4m3fn(w / scale)."""
    (bm, bn), (m, n), w = block, w.shape, w.float()
    scale = torch.empty(math.ceil(m / bm), math.ceil(n / bn))
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            scale[i, j] = w[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn].abs().amax().clamp_min(1e-12) / E4M3_MAX
    full = scale.repeat_interleave(bm, 0).repeat_interleave(bn, 1)[:m, :n]
    return (w / full).to(torch.float8_e4m3fn), scale


def _fp8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.abs().amax(1, keepdim=True).clamp_min(1e-12) / E4M3_MAX
    return (w / scale).to(torch.float8_e4m3fn), scale


def _rewrite(src: Path, dst: Path, layout: str, block: tuple[int, int] = (32, 32), fp8: bool = True) -> Path:
    """Copy checkpoint ``src`` to ``dst`` with every decoder linear stored in FP8 (``layout`` "fp8":
    DeepSeek's ``weight_scale_inv`` tiles; "ct": compressed-tensors' per-channel ``weight_scale``), or,
    with ``fp8`` False, in float32 holding exactly those FP8 weights' values (the same model)."""
    dst.mkdir(parents=True)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    weight_map = {}
    for shard in sorted(set(index["weight_map"].values())):
        out = {}
        for name, t in load_file(src / shard).items():
            if name.startswith("model.layers.") and name.endswith(("_proj.weight", "_proj_with_mqa.weight")):
                w8, scale = _fp8_per_channel(t) if layout == "ct" else _fp8_tiles(t, block)
                if not fp8:  # the dequantized values in full precision
                    full = scale if layout == "ct" else scale.repeat_interleave(block[0], 0).repeat_interleave(
                        block[1], 1)[:t.shape[0], :t.shape[1]]
                    out[name] = w8.float() * full
                    continue
                out[name] = w8
                out[name[: -len("weight")] + ("weight_scale" if layout == "ct" else "weight_scale_inv")] = scale
            else:
                out[name] = t
        save_file(out, str(dst / shard), metadata={"format": "pt"})
        weight_map.update({n: shard for n in out})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = json.loads((src / "config.json").read_text())
    if fp8 and layout == "fp8":
        cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": list(block)}
    elif fp8 and layout == "ct":
        cfg["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                "num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False}}},
            "ignore": ["lm_head"]}
    (dst / "config.json").write_text(json.dumps(cfg))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (dst / f).write_bytes((src / f).read_bytes())
    return dst


@pytest.fixture(scope="module")
def sources(tmp_path_factory, smollm2_dir):
    root = tmp_path_factory.mktemp("fp8")
    bf = tiny_checkpoint_with_tokenizer(root / "orig", smollm2_dir, 2, 2, 0)
    # 32 x 32 tiles: hidden 64 and MLP 128 make several per weight; 48 x 48 leaves ragged edge tiles
    return {"orig": bf, "fp8": _rewrite(bf, root / "fp8", "fp8"), "fp32": _rewrite(bf, root / "fp32", "fp8", fp8=False),
            "fp8-ragged": _rewrite(bf, root / "fp8r", "fp8", (48, 48)),
            "fp32-ragged": _rewrite(bf, root / "fp32r", "fp8", (48, 48), fp8=False),
            "ct": _rewrite(bf, root / "ct", "ct"), "ct32": _rewrite(bf, root / "ct32", "ct", fp8=False)}


def test_fp8_blocks_read_as_the_same_model_in_full_precision(sources):
    """Block tensors from an FP8 source are exactly the float32 model holding the same values (the
    scales never show as tensors of the block), and within FP8's rounding of the original weights:
    e4m3 keeps 3 mantissa bits, so a relative error of at most 2^-4 above its normal range."""
    for fp8, fp32 in (("fp8", "fp32"), ("fp8-ragged", "fp32-ragged"), ("ct", "ct32")):
        a, b = Checkpoint(str(sources[fp8])), Checkpoint(str(sources[fp32]))
        assert a.block_names(1) == b.block_names(1) and a.other_names() == b.other_names()
        block_a, fp_a = a.read_block(1)
        block_b, _ = b.read_block(1)
        assert set(block_a) == set(block_b) and not any("scale" in k for k in block_a)
        for k in block_a:
            assert block_a[k].dtype == torch.float32 and torch.equal(block_a[k], block_b[k]), (fp8, k)
        assert fp_a == a.read_block(1)[1]  # the fingerprint covers the FP8 bytes and their scales
        assert a.nbytes(a.block_names(1)) > sum(t.numel() for t in block_a.values())  # scales counted
    orig, _ = Checkpoint(str(sources["orig"])).read_block(1)
    block, _ = Checkpoint(str(sources["fp8"])).read_block(1)
    w, w8 = orig["mlp.down_proj.weight"], block["mlp.down_proj.weight"]
    normal = w.abs() > w.abs().amax() * 2.0**-6 / E4M3_MAX * 2**4  # away from e4m3's subnormals
    assert normal.float().mean() > 0.9
    assert ((w8 - w).abs() / w.abs())[normal].max() <= 2.0**-4 + 1e-6
    assert not torch.equal(w8, w)


def test_fp8_source_quantizes_to_the_same_output(sources, texts_dir, tmp_path, ray_local):
    """The whole pipeline on the FP8 source writes the bytes it writes for the float32 model with
    the same values, and a config without the source's FP8 quantization_config."""
    outs = {}
    for name in ("fp8", "fp32"):
        cfg = _cfg(sources[name], tmp_path / name, texts_dir / "calib.txt", method="rtn", format="native")
        run(cfg, log=lambda m: None)
        outs[name] = {p.name: p.read_bytes() for p in sorted((tmp_path / name).glob("*.safetensors"))}
    assert outs["fp8"] == outs["fp32"] and outs["fp8"]
    written = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert "quantization_config" not in written


def test_quantized_or_unscaled_sources_are_refused(sources, tmp_path):
    gptq = tmp_path / "gptq"
    gptq.mkdir()
    for p in sources["orig"].iterdir():
        (gptq / p.name).write_bytes(p.read_bytes())
    cfg = json.loads((gptq / "config.json").read_text())
    (gptq / "config.json").write_text(json.dumps(cfg | {"quantization_config": {"quant_method": "gptq", "bits": 4}}))
    with pytest.raises(CheckpointError, match="already quantized.*gptq"):
        Checkpoint(str(gptq))
    bare = tmp_path / "bare"  # FP8 weights, but config.json says nothing of their scales
    bare.mkdir()
    for p in sources["fp8"].iterdir():
        (bare / p.name).write_bytes(p.read_bytes())
    cfg = json.loads((bare / "config.json").read_text())
    cfg.pop("quantization_config")
    (bare / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="F8_E4M3 but config.json declares no quantization_config"):
        Checkpoint(str(bare))


# ---------------------------------------------------------------------------------------- DeepSeek-V3 from S3
@pytest.fixture(scope="module")
def deepseek_sources(tmp_path_factory, smollm2_dir, s3):
    """A tiny random DeepSeek-V3 (a dense block, then a routed one: MLA, a shared expert, 4 routed experts in
    the Hub's per-expert layout) written by save_pretrained in bf16, the same model as DeepSeek's FP8 release
    stores it (every decoder linear float8_e4m3fn with a float32 ``weight_scale_inv`` per 32 x 32 tile, the
    router, norms, embeddings and head in bf16; DeepSeek's 128 x 128 tiles scaled to the tiny widths so that
    each weight has several); both uploaded to the S3 server."""
    root = tmp_path_factory.mktemp("deepseek-fp8")
    bf16 = copy_tokenizer(write_hub_checkpoint(tiny_family_model("deepseek_v3").to(torch.bfloat16), root / "bf16"),
                          smollm2_dir)
    fp8 = _rewrite(bf16, root / "fp8", "fp8")
    return {"bf16": bf16, "fp8": fp8, "bf16-url": upload_dir(s3, bf16, "deepseek-bf16"),
            "fp8-url": upload_dir(s3, fp8, "deepseek-fp8")}


def test_deepseek_v3_fp8_from_s3_quantizes_like_its_bf16_write(deepseek_sources, s3, texts_dir, tmp_path, ray_local):
    """RTN W4 g32 through the whole pipeline (Ray, reading from the S3 server) on DeepSeek-V3's FP8 layout and on
    the same model written in bf16. What holds, and the tolerance:
    - the FP8 source reads as exactly its float32 dequantization (weight * its tile's scale_inv): the reader
      adds no error of its own (test_fp8_source_quantizes_to_the_same_output: the same bytes as a float32
      write of those values, on a Llama);
    - its weights are the bf16 ones within FP8's rounding: e4m3 keeps 3 mantissa bits, a relative error of at
      most 2^-4 in its normal range (every tensor that is not a decoder linear is the bf16 one);
    - so the two quantized models differ by that rounding, through RTN's grid: each element of the output is
      its input rounded to its own group's grid (within half a step s of it), and element by element
      |Q(W8) - Q(W)| <= |W8 - W| + (s8 + s) / 2. Most codes are the same (92% here); the others differ by
      one grid step, where FP8's rounding (up to 1/16 of a weight) crossed a rounding boundary of the 4-bit grid
      (a step is about 2/15 of the group's largest weight)."""
    from lsiq.quantizer import QuantSpec
    from pipeline import formats
    from pipeline.model_io import read_manifest

    opts = s3.storage_options()
    src = deepseek_sources
    fp8, bf16 = Checkpoint(src["fp8-url"], opts), Checkpoint(src["bf16-url"], opts)
    assert fp8.arch.family.name == "deepseek_v3" and fp8.source_quant.block == (32, 32)
    raw, blocks = {}, []
    for f in sorted(src["fp8"].glob("*.safetensors")):
        raw.update(load_file(f))
    for i in range(2):
        block8, _ = fp8.read_block(i)
        block, _ = bf16.read_block(i)
        assert set(block8) == set(block) and not any("scale" in k for k in block8)
        fp8_linears = 0
        for k, w8 in block8.items():
            name = f"model.layers.{i}.{k}"
            if name + "_scale_inv" not in raw:  # not FP8 in the source: as in the bf16 write
                assert torch.equal(w8, block[k].to(w8.dtype)), k
                continue
            fp8_linears += 1
            tiles = raw[name + "_scale_inv"].repeat_interleave(32, 0).repeat_interleave(32, 1)
            assert torch.equal(w8, raw[name].float() * tiles[:w8.shape[0], :w8.shape[1]]), k
            w = block[k].float()
            normal = w.abs() > tiles[:w.shape[0], :w.shape[1]] * 2.0**-6 * 2**4  # away from e4m3's subnormals
            assert ((w8 - w).abs() / w.abs())[normal].max() <= 2.0**-4 + 1e-6, k
        assert fp8_linears == (5 + 3 if i == 0 else 5 + 3 + 4 * 3)  # MLA's 5; the dense MLP's 3 or 5 experts' 3
        blocks.append((block8, block))

    outs = {}
    for name in ("fp8", "bf16"):
        cfg = _cfg(src[f"{name}-url"], tmp_path / name, texts_dir / "calib.txt", method="rtn", format="native",
                   storage_options=opts)
        cfg.calib_cfg.wbits = 4
        run(cfg, log=lambda m: None)
        outs[name] = {}
        for f in sorted((tmp_path / name).glob("*.safetensors")):
            outs[name].update(load_file(f))
    assert outs["fp8"].keys() == outs["bf16"].keys()
    assert read_manifest(str(tmp_path / "fp8"))["status"] == "complete"
    assert "quantization_config" not in json.loads((tmp_path / "fp8" / "config.json").read_text())

    spec = QuantSpec(4, 32)
    deq = {k: formats.dequantize_tensors("native", outs[k], spec) for k in ("fp8", "bf16")}
    same = total = 0
    for k in (k for k in outs["fp8"] if k.endswith(".scales")):
        name = k[: -len("scales")] + "weight"
        layer, short = int(name.split(".")[2]), name.split(".", 3)[3]
        w8, w = blocks[layer][0][short], blocks[layer][1][short].float()
        q8, q = deq["fp8"][name].float(), deq["bf16"][name].float()
        s8, s = (outs[x][k].float().repeat_interleave(32, 1) for x in ("fp8", "bf16"))
        assert ((q8 - w8).abs() <= s8 / 2 * (1 + 1e-3)).all() and ((q - w).abs() <= s / 2 * (1 + 1e-3)).all(), name
        assert ((q8 - q).abs() <= (w8 - w).abs() + (s8 + s) / 2 * (1 + 1e-3)).all(), name
        steps = ((q8 - q).abs() / s).round()
        same, total = same + (steps == 0).sum().item(), total + steps.numel()
    assert total > 0 and same / total > 0.85, same / total
