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
    assert f"block {len(done) + 1}/8  output MSE" in r.stderr and f"block {len(done)}/8  replayed" in r.stderr
    assert json.loads(fs.cat_file("lsiq/part/lsiq_manifest.json"))["status"] == "complete"
    full, part = outputs("full"), outputs("part")
    assert sum(k.startswith("model-layers-") for k in full) == 8 and "lsiq_manifest.json" in full
    assert full == part
