"""A job killed with SIGKILL mid-run resumes where it stopped and gives the same bytes."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import tiny_llama_config, write_sharded_checkpoint


def _files(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in d.rglob("*")
            if p.is_file() and not str(p.relative_to(d)).startswith("checkpoints/")}


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_byte_identical(smollm2_dir, texts_dir, tmp_path):
    torch.manual_seed(1)
    ck = write_sharded_checkpoint(AutoModelForCausalLM.from_config(tiny_llama_config(num_hidden_layers=8, vocab_size=49152)),
                                  tmp_path / "ck", shards=3)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (ck / f).write_bytes((smollm2_dir / f).read_bytes())

    def cmd(out):
        return [sys.executable, "-m", "pipeline.quantize", "--model", str(ck), "--output", str(out), "--calib",
                str(texts_dir / "calib.txt"), "--method", "lsi", "--wbits", "3", "--group-size", "32", "--nsamples", "8",
                "--seqlen", "64", "--epochs", "4", "--num-cpus", "1"]

    full, part = tmp_path / "full", tmp_path / "part"
    subprocess.run(cmd(full), check=True, capture_output=True)

    proc = subprocess.Popen(cmd(part), stderr=subprocess.PIPE, text=True, start_new_session=True)
    killed_after = None
    for line in proc.stderr:
        if line.startswith("block 3/8"):
            os.killpg(proc.pid, signal.SIGKILL)  # the job and its embedded Ray die at once
            killed_after = 3
            break
    proc.wait()
    assert killed_after == 3 and proc.returncode == -signal.SIGKILL
    assert not (part / "lsiq_manifest.json").exists()
    done = sorted(p.name for p in (part / "checkpoints").glob("block-*.json"))
    assert 3 <= len(done) < 8

    r = subprocess.run(cmd(part), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resuming: blocks 0..{len(done) - 1} are done" in r.stderr
    assert f"block {len(done) + 1}/8  loss" in r.stderr and f"block {len(done)}/8  replayed" in r.stderr
    assert json.loads((part / "lsiq_manifest.json").read_text())["status"] == "complete"
    assert _files(full) == _files(part)
