"""The local pipeline on a random tiny Llama checkpoint with a real local Ray."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lsiq import methods
from lsiq.arch import UnsupportedArchitecture
from lsiq.config import CalibConfig
from lsiq.evaluation import perplexity
from pipeline.checkpoint import Checkpoint, CheckpointError
from pipeline.config import QuantizeConfig, parse_quantize_args
from pipeline.driver import run
from pipeline.model_io import MANIFEST, load_quantized
from pipeline.resume import ResumeMismatch


def _cfg(model, out, calib, method="lsi", **kw):
    calib_cfg = CalibConfig(method=method, wbits=3, group_size=32, epochs=2, batch_size=2, seed=0, lsi_block_k=4,
                            lr_lsi=1e-3)
    return QuantizeConfig(model=str(model), output=str(out), calib=[str(calib)], calib_cfg=calib_cfg,
                          nsamples=4, seqlen=32, **kw)


def _run(cfg):
    return run(cfg, log=lambda m: None)


def test_checkpoint_reads_one_block(tiny_checkpoint):
    ck = Checkpoint(str(tiny_checkpoint))
    block, fp = ck.read_block(1)
    assert fp == ck.read_block(1)[1] and fp != ck.read_block(2)[1]
    assert set(block) >= {"self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"}
    assert all(not k.startswith("model.") for k in block)
    full = {}
    for f in tiny_checkpoint.glob("*.safetensors"):
        full.update(load_file(f))
    for k, v in block.items():
        assert torch.equal(v, full[f"model.layers.1.{k}"])
    assert "model.embed_tokens.weight" in ck.other_names()


@pytest.mark.parametrize("method", ["rtn", "gptq", "lsi", methods.default_method(3)])
def test_quantize_and_load(tiny_runs, method):
    out, report = tiny_runs(method)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["status"] == "complete" and manifest["num_layers"] == 3
    assert len(report["blocks"]) == 3
    if method != "rtn":
        assert sum(b["loss_after"] for b in report["blocks"]) < sum(b["loss_before"] for b in report["blocks"])
        assert sum(b["rel_after"] for b in report["blocks"]) < sum(b["rel_before"] for b in report["blocks"])
    assert all(0 < b["rel_before"] < 10 for b in report["blocks"])  # a fraction of the FP output, not an MSE
    assert (out.parent / "r.png").stat().st_size > 1000
    if method == "rtn":  # the perplexity a user measures afterwards goes into the report and the plot
        from pipeline.report import add_perplexity

        png = Path(add_perplexity(str(out.parent / "r.json"), "eval.txt", 30.9, 46.9))
        assert json.loads((out.parent / "r.json").read_text())["perplexity"] == {
            "text": "eval.txt", "before": 30.9, "after": 46.9}
        assert png.stat().st_size > 1000
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert "model.layers.2.self_attn.q_proj.qweight" in index["weight_map"]
    model, _ = load_quantized(str(out))
    ids = torch.randint(0, 1000, (2, 16))
    assert torch.isfinite(torch.tensor(perplexity(model, ids)))


def test_same_seed_same_bytes_with_spilled_caches(tiny_checkpoint, texts_dir, tmp_path, tiny_runs):
    (a, ra), b = tiny_runs("lsi"), tmp_path / "b"
    # a 1-byte budget puts every activation cache in a memory-mapped file under spill/
    rb = _run(_cfg(tiny_checkpoint, b, texts_dir / "calib.txt", activation_budget=1, spill_dir=str(tmp_path / "spill")))
    assert not ra["activation_spilled"] and rb["activation_spilled"]
    assert list((tmp_path / "spill").iterdir()) == []  # spill files are unlinked once mapped
    files = sorted(p.name for p in a.iterdir() if p.is_file())  # checkpoints/ records hold timings
    assert files == sorted(p.name for p in b.iterdir() if p.is_file())
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    for blk in rb["blocks"]:
        assert blk["bytes_read"] > 0 and blk["bytes_written"] > 0 and blk["io_wait_seconds"] >= 0
        assert blk["peak_rss_calibrator"] > 0 and blk["peak_rss_reader"] > 0 and blk["peak_rss_writer"] > 0
    assert set(rb["peak_rss"]) == {"driver", "reader", "calibrator", "writer"}


def test_shard_size_cap_splits_blocks(tiny_checkpoint, texts_dir, tmp_path, tiny_runs):
    whole, split = tiny_runs("rtn")[0], tmp_path / "split"
    _run(_cfg(tiny_checkpoint, split, texts_dir / "calib.txt", method="rtn", max_shard_bytes=6_000))
    parts = sorted(p.name for p in split.glob("model-layers-00001-*.safetensors"))
    assert len(parts) > 1 and parts[0] == f"model-layers-00001-00001-of-{len(parts):05d}.safetensors"
    for p in parts:
        tensors = load_file(split / p)
        assert len(tensors) == 1 or sum(t.numel() * t.element_size() for t in tensors.values()) <= 6_000
    index = json.loads((split / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in split.glob("*.safetensors")}
    a, _ = load_quantized(str(whole))
    b, _ = load_quantized(str(split))
    for (na, ta), (nb, tb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert na == nb and torch.equal(ta, tb), na


def test_output_with_other_run_is_refused(tiny_checkpoint, texts_dir, tmp_path, tiny_runs):
    out = Path(shutil.copytree(tiny_runs("rtn")[0], tmp_path / "out"))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    # the same command again: complete already, nothing rewritten
    assert _run(_cfg(tiny_checkpoint, out, texts_dir / "calib.txt", method="rtn")) == {
        "already_complete": True, "output": str(out)}
    other = _cfg(tiny_checkpoint, out, texts_dir / "calib.txt", method="gptq")
    with pytest.raises(ResumeMismatch, match="method: 'rtn' -> 'gptq'"):
        _run(other)
    assert before == {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    other.restart = True
    _run(other)
    assert json.loads((out / MANIFEST).read_text())["quantization"]["method"] == "gptq"


def test_resume_from_partial_output_is_byte_identical(tiny_checkpoint, texts_dir, tmp_path, ray_local):
    """With SDE, cross-layer learning and QERA corrections (native format): the replay feeds the next
    block the stored float16 corrections, as the uninterrupted run did, and block 1 again sees block
    2 for its cross-layer term. (The SIGKILL test covers LSI into GPTQ.)"""
    full, part = tmp_path / "full", tmp_path / "part"

    def cfg(out):
        c = _cfg(tiny_checkpoint, out, texts_dir / "calib.txt", method="sde")
        c.calib_cfg.lowrank, c.calib_cfg.rank, c.calib_cfg.cross_layer, c.calib_cfg.epochs = "qera", 4, True, 1
        c.format = "native"
        return c

    report = _run(cfg(full))
    ck = Checkpoint(str(tiny_checkpoint))  # cross-layer reads each block once (a window of two blocks)
    assert report["bytes_read"] == sum(ck.nbytes(ck.block_names(i)) for i in range(3))
    shutil.copytree(full, part)
    # make `part` look like a run that died after block 0: no manifest, later blocks' files gone
    for name in (MANIFEST, "model.safetensors.index.json", "model-layers-00001.safetensors",
                 "model-layers-00002.safetensors", "checkpoints/block-00001.json", "checkpoints/block-00002.json"):
        (part / name).unlink()
    # blocks calibrated on another device type are not resumed here: refused before any block is calibrated
    record = part / "checkpoints" / "block-00000.json"
    original = record.read_text()
    rec = json.loads(original)
    assert rec["stats"]["device"] == "cpu"
    rec["stats"]["device"] = "cuda"
    record.write_text(json.dumps(rec))
    with pytest.raises(ResumeMismatch, match="blocks 0..0 calibrated on cuda, and this run would calibrate on cpu"):
        run(cfg(part))
    assert not (part / MANIFEST).exists() and not (part / "model-layers-00001.safetensors").exists()
    record.write_text(original)
    logs = []
    report = run(cfg(part), log=logs.append)
    assert report["resumed_blocks"] == 1 and report["lowrank_bytes"] > 0
    assert any("resuming: blocks 0..0 are done" in m for m in logs)
    names = sorted(str(p.relative_to(full)) for p in full.rglob("*") if p.is_file())
    assert names == sorted(str(p.relative_to(part)) for p in part.rglob("*") if p.is_file())
    for name in names:
        if not name.startswith("checkpoints/"):  # records hold timings
            assert (full / name).read_bytes() == (part / name).read_bytes(), name


def test_default_method_resumes_byte_identical(tiny_checkpoint, texts_dir, tmp_path, tiny_runs):
    """The default method (learned rounding offsets, LET and clipping trained per block) resumed after
    block 0 writes the same bytes as its uninterrupted run."""
    method = methods.default_method(3)
    full, _ = tiny_runs(method)
    part = tmp_path / "part"
    shutil.copytree(full, part)
    for name in (MANIFEST, "model.safetensors.index.json", "model-layers-00001.safetensors",
                 "model-layers-00002.safetensors", "checkpoints/block-00001.json", "checkpoints/block-00002.json"):
        (part / name).unlink()
    report = _run(_cfg(tiny_checkpoint, part, texts_dir / "calib.txt", method=method))
    assert report["resumed_blocks"] == 1
    names = sorted(str(p.relative_to(full)) for p in full.rglob("*") if p.is_file())
    assert names == sorted(str(p.relative_to(part)) for p in part.rglob("*") if p.is_file())
    for name in names:
        if not name.startswith("checkpoints/"):  # records hold timings
            assert (full / name).read_bytes() == (part / name).read_bytes(), name


def test_corrupt_shard_is_redone(tiny_checkpoint, texts_dir, tmp_path, tiny_runs):
    out = Path(shutil.copytree(tiny_runs("rtn")[0], tmp_path / "out"))
    good = (out / "model-layers-00001.safetensors").read_bytes()
    (out / MANIFEST).unlink()
    (out / "model-layers-00001.safetensors").write_bytes(good[:100])  # half-written object
    report = _run(_cfg(tiny_checkpoint, out, texts_dir / "calib.txt", method="rtn"))
    assert report["resumed_blocks"] == 1
    assert (out / "model-layers-00001.safetensors").read_bytes() == good


def test_bad_inputs(tiny_checkpoint, texts_dir, tmp_path):
    calib = texts_dir / "calib.txt"
    # group size that does not divide the hidden size (64)
    cfg = _cfg(tiny_checkpoint, tmp_path / "o1", calib)
    cfg.calib_cfg = CalibConfig(method="rtn", wbits=3, group_size=48)
    with pytest.raises(ValueError, match="group size 48 does not divide"):
        _run(cfg)
    # missing tensor
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    shard = next(broken.glob("*.safetensors"))
    tensors = load_file(shard)
    tensors.pop("model.layers.1.mlp.up_proj.weight", None)
    from safetensors.torch import save_file

    save_file(tensors, str(shard))
    with pytest.raises(CheckpointError, match="missing tensor model.layers.1.mlp.up_proj.weight"):
        _run(_cfg(broken, tmp_path / "o2", calib))
    # unsupported architecture
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UnsupportedArchitecture, match="gpt2"):
        _run(_cfg(gpt2, tmp_path / "o3", calib))
    # not a checkpoint at all
    with pytest.raises(CheckpointError, match="no config.json"):
        _run(_cfg(tmp_path / "nowhere", tmp_path / "o4", calib))
    for o in ("o1", "o2", "o3", "o4"):
        assert not (tmp_path / o / MANIFEST).exists()


def test_nan_weights_are_refused(tiny_checkpoint, tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "nan"
    shutil.copytree(tiny_checkpoint, bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    shard = bad / index["weight_map"]["model.layers.0.self_attn.k_proj.weight"]
    tensors = load_file(shard)
    tensors["model.layers.0.self_attn.k_proj.weight"][0, 0] = float("nan")
    save_file(tensors, str(shard))
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        Checkpoint(str(bad)).read_block(0)


def test_truncated_shard_is_refused(tiny_checkpoint, tmp_path):
    bad = tmp_path / "trunc"
    shutil.copytree(tiny_checkpoint, bad)
    shard = sorted(bad.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        Checkpoint(str(bad))


def test_cli_parsing_errors():
    with pytest.raises(SystemExit):
        parse_quantize_args(["--model", "m", "--output", "o", "--calib", "c", "--wbits", "9"])
    cfg = parse_quantize_args(["--model", "m", "--output", "o", "--calib", "c", "--method", "gptq",
                               "--group-size", "0", "--abits", "8"])
    assert cfg.calib_cfg.method == "gptq" and cfg.calib_cfg.group_size == 0 and cfg.calib_cfg.abits == 8
    cfg = parse_quantize_args(["--model", "m", "--output", "o", "--calib", "c", "--forward-batch-size", "2"])
    assert cfg.calib_cfg.forward_batch_size == 2 and parse_quantize_args(
        ["--model", "m", "--output", "o", "--calib", "c"]).calib_cfg.forward_batch_size == 0
    with pytest.raises(SystemExit, match="forward_batch_size must be >= 0"):
        parse_quantize_args(["--model", "m", "--output", "o", "--calib", "c", "--forward-batch-size", "-1"])
    cfg = parse_quantize_args(["--model", "m", "--output", "o", "--calib", "c", "--svd", "full", "--svd-dtype", "float32"])
    assert (cfg.calib_cfg.svd, cfg.calib_cfg.svd_dtype) == ("full", "float32")
    default = parse_quantize_args(["--model", "m", "--output", "o", "--calib", "c"]).calib_cfg
    assert (default.svd, default.svd_dtype) == ("gram", "auto")


def test_header_that_disagrees_with_file_size_is_refused(tiny_checkpoint, tmp_path):
    import struct

    bad = tmp_path / "hdr"
    shutil.copytree(tiny_checkpoint, bad)
    shard = sorted(bad.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[:8] = struct.pack("<Q", len(data))  # header length larger than the file
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{shard.name}: header length {len(data)} does not fit the file size"):
        Checkpoint(str(bad))


def test_nan_in_a_later_block_fails_the_cli_run_cleanly(tiny_checkpoint, texts_dir, tmp_path):
    """The reader actor finds the NaN mid-run: the CLI exits 2 with the plain message, no manifest."""
    import subprocess
    import sys

    from safetensors.torch import save_file

    bad = tmp_path / "nan2"
    shutil.copytree(tiny_checkpoint, bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    shard = bad / index["weight_map"]["model.layers.2.mlp.up_proj.weight"]
    tensors = load_file(shard)
    tensors["model.layers.2.mlp.up_proj.weight"][3, 1] = float("inf")
    save_file(tensors, str(shard), metadata={"format": "pt"})
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "pipeline.quantize", "--model", str(bad), "--output", str(out), "--calib",
                        str(texts_dir / "calib.txt"), "--method", "rtn", "--group-size", "32", "--nsamples", "2",
                        "--seqlen", "16", "--num-cpus", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "error: tensor model.layers.2.mlp.up_proj.weight contains NaN or Inf values" in r.stderr
    assert "Traceback" not in r.stderr.split("error:")[-1]
    assert not (out / MANIFEST).exists() and (out / "checkpoints" / "block-00001.json").exists()


def test_bad_calibration_text_writes_nothing_and_the_fixed_rerun_works(tiny_checkpoint, texts_dir, tmp_path, ray_local):
    """An empty calibration file is found before the output is touched, so the corrected rerun needs no --restart."""
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=f"calibration text {empty} is empty"):
        _run(_cfg(tiny_checkpoint, out, empty, method="rtn"))
    assert not out.exists()
    report = _run(_cfg(tiny_checkpoint, out, texts_dir / "calib.txt", method="rtn"))
    assert report["resumed_blocks"] == 0 and (out / MANIFEST).exists()


def test_run_that_finished_no_block_is_replaced_by_new_settings(tiny_checkpoint, texts_dir, tmp_path, tiny_runs):
    """A run record without a finished block holds nothing worth keeping; a finished block is protected."""
    src, _ = tiny_runs("rtn")
    out = tmp_path / "out"
    shutil.copytree(src, out)
    calib = texts_dir / "calib.txt"
    with pytest.raises(ResumeMismatch, match="different settings"):
        _run(_cfg(tiny_checkpoint, out, calib, method="gptq"))
    (out / MANIFEST).unlink()
    for f in (out / "checkpoints").glob("block-*"):
        f.unlink()
    report = _run(_cfg(tiny_checkpoint, out, calib, method="gptq"))
    assert report["resumed_blocks"] == 0 and json.loads((out / MANIFEST).read_text())["status"] == "complete"


def test_evaluate_bad_inputs_exit_2_with_one_line(tiny_checkpoint, texts_dir, tmp_path, capsys):
    from pipeline import evaluate

    text = str(texts_dir / "eval.txt")
    unfinished = tmp_path / "unfinished"
    (unfinished / "checkpoints").mkdir(parents=True)
    (unfinished / "checkpoints" / "run.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    cases = [(["--model", str(tmp_path / "nowhere")], "no such file or directory"),
             (["--model", str(unfinished)], "an unfinished pipeline.quantize run"),
             (["--model", str(tmp_path / "empty")], "not a checkpoint (no config.json)"),
             (["--model", str(tiny_checkpoint), "--seqlen", "1"], "--seqlen must be >= 2"),
             (["--model", str(tiny_checkpoint), "--max-windows", "0"], "--max-windows must be >= 1"),
             (["--model", str(tiny_checkpoint), "--batch-size", "0"], "--batch-size must be >= 1")]
    for args, expected in cases:
        with pytest.raises(SystemExit) as e:
            evaluate.main([*args, "--text", text])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and err == [err[0]] and expected in err[0], (args, err)


def test_unreadable_json_names_the_file(tmp_path):
    import fsspec

    from pipeline import storage

    bad = tmp_path / "config.json"
    bad.write_text('{"model_type": ')
    with pytest.raises(ValueError, match=f"{bad} is not valid JSON"):
        storage.read_json(fsspec.filesystem("file"), str(bad))


def test_quantize_help_imports_no_torch_transformers_or_ray():
    """--help is built from the config dataclasses and the method table alone: what makes it quick."""
    import subprocess
    import sys

    code = ("import sys\nfrom pipeline.quantize import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'ray') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "lwc-let-round" in r.stdout and "example:" in r.stdout
    assert r.stdout.strip().splitlines()[-1] == "[]"


def test_output_that_is_a_file_is_refused_in_plain_words(tiny_checkpoint, texts_dir, tmp_path, capsys):
    from pipeline.quantize import main

    f = tmp_path / "model.bin"
    f.write_bytes(b"keep me")
    for out, expected in ((f, "is a file, not a folder"), (f / "sub", "which is a file, not a folder")):
        rc = main(["--model", str(tiny_checkpoint), "--output", str(out), "--calib", str(texts_dir / "calib.txt"),
                   "--method", "rtn", "--nsamples", "2", "--seqlen", "32"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("error: --output") and expected in err[0], err
    assert f.read_bytes() == b"keep me"


@pytest.mark.parametrize("failure", ["storage", "disk", "calibrator"])
def test_a_run_that_fails_on_its_way_exits_1_with_one_line(tiny_checkpoint, texts_dir, tmp_path, capsys,
                                                           monkeypatch, failure):
    """Exit 1 (not 2, the bad-input status) when the run itself fails: one line that says the
    finished blocks are kept and the same command resumes."""
    import errno

    import pipeline.driver
    from pipeline.quantize import main
    from pipeline.storage import StorageError

    raised = {"storage": StorageError("write s3://b/out/model-00002.safetensors: still failing after 7 attempts"),
              "disk": OSError(errno.ENOSPC, "cannot write out/model-00002.safetensors: No space left on device"),
              "calibrator": RuntimeError("calibrator workers died 3 times; giving up")}[failure]

    def failing_run(cfg, log=None):
        raise raised

    monkeypatch.setattr(pipeline.driver, "run", failing_run)
    rc = main(["--model", str(tiny_checkpoint), "--output", str(tmp_path / "out"), "--calib",
               str(texts_dir / "calib.txt"), "--method", "rtn", "--nsamples", "2", "--seqlen", "32"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1, err
    assert err[0].startswith("error: ") and str(raised) in err[0] and "rerun the same command to resume" in err[0]


def test_integer_weight_in_a_late_block_is_refused_before_block_0(tiny_checkpoint, tmp_path):
    """Every header is checked when the checkpoint opens: an I32 linear in the last block is named
    with its shard, not found by the calibrator after the earlier blocks."""
    from safetensors.torch import save_file

    bad = tmp_path / "int"
    shutil.copytree(tiny_checkpoint, bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    name = "model.layers.2.mlp.down_proj.weight"
    shard = bad / index["weight_map"][name]
    tensors = load_file(shard)
    tensors[name] = tensors[name].to(torch.int32)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"{name} in {shard.name} has dtype I32"):
        Checkpoint(str(bad))
