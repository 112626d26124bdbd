"""The pipeline against a real S3 server (SeaweedFS on 127.0.0.1): S3 -> S3 runs, transient
faults through a fault-injecting proxy, and bad URLs or credentials."""

import json
import os
import subprocess
import sys

import pytest
import s3fs

from pipeline.driver import run
from pipeline.resume import ResumeMismatch
from pipeline.storage import StorageError
from tests.conftest import upload_dir
from tests.fault_proxy import FaultProxy
from tests.test_pipeline import _cfg


def _fs(opts):
    return s3fs.S3FileSystem(skip_instance_cache=True, **opts)


def _remote_files(opts, url):
    fs = _fs(opts)
    root = url.removeprefix("s3://")
    return {p[len(root) + 1:]: fs.cat_file(p) for p in fs.find(root) if not p[len(root) + 1:].startswith("checkpoints/")}


def _local_files(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in d.rglob("*")
            if p.is_file() and not str(p.relative_to(d)).startswith("checkpoints/")}


@pytest.fixture(scope="module")
def tiny_s3(s3, tiny_checkpoint):
    return upload_dir(s3, tiny_checkpoint, "tiny")


def _s3_cfg(url, out, texts_dir, opts, **kw):
    return _cfg(url, out, texts_dir / "calib.txt", storage_options=opts, **kw)


def test_s3_to_s3_equals_local_run(s3, tiny_s3, texts_dir, tiny_runs):
    opts = s3.storage_options()
    local = tiny_runs("lsi")[0]
    report = run(_s3_cfg(tiny_s3, "s3://lsiq/out/tiny-q", texts_dir, opts), log=lambda m: None)
    assert report["bytes_read"] > 0 and report["bytes_written"] > 0
    assert _remote_files(opts, "s3://lsiq/out/tiny-q") == _local_files(local)
    # the same command again: the manifest says complete, nothing to do
    assert run(_s3_cfg(tiny_s3, "s3://lsiq/out/tiny-q", texts_dir, opts), log=lambda m: None)["already_complete"]
    # a different run into the same prefix is refused, naming the difference
    with pytest.raises(ResumeMismatch, match="epochs: 2 -> 3"):
        cfg = _s3_cfg(tiny_s3, "s3://lsiq/out/tiny-q", texts_dir, opts)
        cfg.calib_cfg.epochs = 3
        run(cfg, log=lambda m: None)


def test_transient_faults_are_retried_with_same_output(s3, tiny_s3, texts_dir, tmp_path, ray_local, monkeypatch):
    opts = s3.storage_options()
    run(_s3_cfg(tiny_s3, "s3://lsiq/out/clean", texts_dir, opts, method="rtn"), log=lambda m: None)
    monkeypatch.setenv("LSIQ_STORAGE_BACKOFF", "0.05")
    with FaultProxy(s3.endpoint, fail_rate=0.3, seed=3) as proxy:
        faulty = opts | {"client_kwargs": {"endpoint_url": proxy.start()}}
        run(_s3_cfg(tiny_s3, "s3://lsiq/out/faulty", texts_dir, faulty, method="rtn"), log=lambda m: None)
        assert proxy.injected_503 > 3 and proxy.injected_drops > 3, vars(proxy)
    assert _remote_files(opts, "s3://lsiq/out/faulty") == _remote_files(opts, "s3://lsiq/out/clean")


def _cli_start(args, env=None):
    """The CLI with ``env`` over this environment; a value of None removes that variable."""
    full = {k: v for k, v in (os.environ | (env or {})).items() if v is not None}
    return subprocess.Popen([sys.executable, "-m", "pipeline.quantize", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=full)


def test_bad_urls_and_credentials_fail_clearly(s3, tiny_s3, texts_dir):
    calib = ["--calib", str(texts_dir / "calib.txt"), "--method", "rtn", "--nsamples", "2", "--seqlen", "16",
             "--group-size", "32"]
    endpoint = json.dumps({"client_kwargs": {"endpoint_url": s3.endpoint}})
    creds = s3.credentials_env()
    fs = _fs(s3.storage_options())
    broken = "lsiq/broken"  # a missing shard in the bucket
    fs.copy(tiny_s3.removeprefix("s3://"), broken, recursive=True)
    victim = sorted(p for p in fs.find(broken) if p.endswith(".safetensors"))[0]
    fs.rm(victim)
    dead = json.dumps({"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"},
                       "config_kwargs": {"retries": {"max_attempts": 1}}})
    cases = [  # (args, environment, what stderr must say); the CLI runs go side by side
        # wrong secret: refused, and the secret is not printed
        (["--model", tiny_s3, "--storage-options", endpoint], creds | {"AWS_SECRET_ACCESS_KEY": "not-the-secret"},
         "refused"),
        # a bucket that does not exist
        (["--model", "s3://no-such-bucket/model", "--storage-options", endpoint], creds,
         "no config.json in 's3://no-such-bucket/model'"),
        # nothing listening at the endpoint
        (["--model", tiny_s3, "--storage-options", dead], creds | {"LSIQ_STORAGE_RETRIES": "1"},
         "cannot reach model location"),
        (["--model", f"s3://{broken}", "--storage-options", endpoint], creds, f"missing shard {victim.rsplit('/', 1)[1]}"),
        # no credentials anywhere: answered at once (LSIQ_STORAGE_RETRIES would make a retry take minutes)
        (["--model", tiny_s3, "--storage-options", endpoint],
         {k: None for k in creds} | {"AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent",
                                     "AWS_EC2_METADATA_DISABLED": "true", "LSIQ_STORAGE_BACKOFF": "60"},
         "no credentials found"),
    ]
    procs = [_cli_start([*args, "--output", f"s3://lsiq/out/bad{i}", *calib], env)
             for i, (args, env, _) in enumerate(cases, 1)]
    for proc, (_, _, expected) in zip(procs, cases, strict=True):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2 and expected in err and "not-the-secret" not in err, err[-2000:]
    for i in range(1, len(cases) + 1):
        assert not fs.exists(f"lsiq/out/bad{i}/lsiq_manifest.json")


def test_unreachable_output_is_a_storage_error(tiny_s3, s3, texts_dir, monkeypatch):
    monkeypatch.setenv("LSIQ_STORAGE_RETRIES", "1")
    cfg = _s3_cfg(tiny_s3, "s3://lsiq/out/x", texts_dir, s3.storage_options())
    cfg.output_storage_options = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"},
                                  "config_kwargs": {"retries": {"max_attempts": 1}}}
    with pytest.raises(StorageError, match="cannot reach output"):
        run(cfg, log=lambda m: None)
