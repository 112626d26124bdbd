"""A job killed with SIGKILL mid-run (S3 -> S3) resumes where it stopped and gives the same bytes."""

import json
import os
import signal
import subprocess
import sys

import pytest
import s3fs

from tests.conftest import tiny_checkpoint_with_tokenizer, upload_dir
from tests.procs import start_beside


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_byte_identical(smollm2_dir, texts_dir, tmp_path, s3):
    ck = tiny_checkpoint_with_tokenizer(tmp_path / "ck", smollm2_dir, layers=8, shards=3, seed=1)
    src = upload_dir(s3, ck, "sigkill-src")
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3.storage_options())
    env = os.environ | s3.credentials_env()

    def cmd(out):
        return [sys.executable, "-m", "pipeline.quantize", "--model", src, "--output", f"s3://lsiq/{out}",
                "--storage-options", json.dumps({"client_kwargs": {"endpoint_url": s3.endpoint}}),
                "--calib", str(texts_dir / "calib.txt"), "--method", "lsi", "--wbits", "3", "--group-size", "32",
                "--nsamples", "8", "--seqlen", "64", "--epochs", "2", "--num-cpus", "1"]

    def outputs(prefix):  # checkpoint records hold timings; everything else must match
        return {p.split("/", 2)[2]: fs.cat_file(p) for p in fs.find(f"lsiq/{prefix}") if "/checkpoints/" not in p}

    # the uninterrupted run goes side by side with the one to be killed (both spend much of their
    # time starting Ray and its actors); the resumed run must reproduce its bytes
    full_run = start_beside(cmd("full"), tmp_path / "full.log", env)
    try:
        proc = subprocess.Popen(cmd("part"), stderr=subprocess.PIPE, text=True, start_new_session=True, env=env)
        killed_after = None
        for line in proc.stderr:
            if line.startswith("block 3/8"):
                os.killpg(proc.pid, signal.SIGKILL)  # the job and its embedded Ray die at once
                killed_after = 3
                break
        proc.wait()
        assert killed_after == 3 and proc.returncode == -signal.SIGKILL
        assert not fs.exists("lsiq/part/lsiq_manifest.json")
        fs.invalidate_cache()
        done = sorted(fs.glob("lsiq/part/checkpoints/block-*.json"))
        assert 3 <= len(done) < 8
        assert full_run.wait(timeout=600) == 0, (tmp_path / "full.log").read_text()[-2000:]
    finally:
        if full_run.poll() is None:
            os.killpg(full_run.pid, signal.SIGKILL)
    r = subprocess.run(cmd("part"), capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resuming: blocks 0..{len(done) - 1} are done" in r.stderr
    assert f"block {len(done) + 1}/8  error " in r.stderr and f"block {len(done)}/8  replayed" in r.stderr
    assert json.loads(fs.cat_file("lsiq/part/lsiq_manifest.json"))["status"] == "complete"
    full, part = outputs("full"), outputs("part")
    assert sum(k.startswith("model-layers-") for k in full) == 8 and "lsiq_manifest.json" in full
    assert full == part


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_interrupt_prints_one_line_exits_130_and_the_rerun_resumes(smollm2_dir, texts_dir, tmp_path, how):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) or SIGTERM (to the driver,
    as `kill` or a pod's shutdown sends it): one line saying how many blocks are kept, exit 130, no
    traceback; the same command then resumes after those blocks and finishes (checked after Ctrl-C)."""
    ck = tiny_checkpoint_with_tokenizer(tmp_path / "ck", smollm2_dir, layers=6, shards=2, seed=2)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pipeline.quantize", "--model", str(ck), "--output", str(out),
           "--calib", str(texts_dir / "calib.txt"), "--method", "lsi", "--wbits", "3", "--group-size", "32",
           "--nsamples", "4", "--seqlen", "32", "--epochs", "20", "--num-cpus", "1"]
    # 20 epochs: blocks of about a second, so the signal lands while blocks 3-6 still run (at a tenth
    # of a second each the run could finish before this process had read the line "block 2/6")
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("block 2/6"):
            if how == "ctrl-c":
                os.killpg(proc.pid, signal.SIGINT)
            else:
                proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stderr.read()
    proc.wait(timeout=120)
    assert proc.returncode == 130, rest[-3000:]
    assert "Traceback" not in rest and "Aborted" not in rest, rest[-3000:]
    last = rest.strip().splitlines()[-1]
    assert last.startswith("interrupted after ") and "rerun the same command to resume" in last, rest[-3000:]
    kept = len(list((out / "checkpoints").glob("block-*.json")))
    assert f"interrupted after {kept} finished block(s)" in last and 2 <= kept < 6
    assert not (out / "lsiq_manifest.json").exists()
    if how == "sigterm":
        return  # the resume after an interrupt is the same for both signals: run it once, below
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resuming: blocks 0..{kept - 1} are done" in r.stderr
    assert json.loads((out / "lsiq_manifest.json").read_text())["status"] == "complete"


def test_failed_write_removes_its_temporary_file_and_names_the_path(tmp_path, monkeypatch):
    from pipeline import storage

    target = tmp_path / "model.safetensors"

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage.os, "fsync", full_disk)
    with pytest.raises(OSError, match="model.safetensors.*No space left"):
        storage.write_temp(str(target), b"x" * 1000)
    assert os.listdir(tmp_path) == []


def test_leftover_temporary_files_are_removed_before_a_run(tmp_path):
    from pipeline.resume import prepare
    from pipeline.writer import OutputDir

    out_dir = tmp_path / "out"
    (out_dir / "checkpoints").mkdir(parents=True)
    (out_dir / "model-00001.safetensors.tmp-0123abcd").write_bytes(b"half")
    (out_dir / "checkpoints" / "run.json.tmp-89abcdef").write_bytes(b"half")
    (out_dir / "notes.txt").write_text("the user's own file")
    state = prepare(OutputDir(str(out_dir)), {"wbits": 3}, num_layers=2, restart=False)
    assert state.next_block == 0 and not state.complete
    left = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file())
    assert not any(".tmp-" in f for f in left)
    assert "notes.txt" in left


def test_a_block_record_being_written_is_not_counted_as_finished():
    """The interrupt message counts finished blocks while the writer may still hold one record's
    temporary file: that file is not a finished block."""
    from pipeline.resume import block_record_name, is_block_record

    assert is_block_record(block_record_name(2))
    assert not is_block_record(block_record_name(2) + ".tmp-0123abcd")
    assert not is_block_record("checkpoints/run.json")
