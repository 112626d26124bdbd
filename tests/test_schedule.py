"""pipeline.schedule and pipeline.lease against the real S3 server: leases under contention and
takeover, two scheduler processes side by side, half-uploaded checkpoints, RUN.yaml checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import fsspec
import pytest
import s3fs
import yaml

from pipeline import lease as leases
from pipeline import schedule
from pipeline.schedule import quantize_args
from tests.conftest import upload_dir

ROOT = Path(__file__).resolve().parent.parent


def _fs(s3):
    return s3fs.S3FileSystem(skip_instance_cache=True, **s3.storage_options())


# ----------------------------------------------------------------------------- leases


def test_lease_is_exclusive_expires_and_is_released(s3):
    fs = _fs(s3)
    d = "lsiq/leases-unit/a"
    first = leases.try_acquire(fs, d, "one", ttl=60)
    assert first is not None and first.generation == 1
    assert leases.try_acquire(fs, d, "two", ttl=60) is None  # held
    leases.renew(first)
    assert first.generation == 2 and leases.try_acquire(fs, d, "two", ttl=60) is None
    leases.release(first)
    second = leases.try_acquire(fs, d, "two", ttl=0.5)  # released: free at once
    assert second is not None and second.generation == 4
    time.sleep(1.0)  # "two" dies without releasing: its lease expires and is taken over
    third = leases.try_acquire(fs, d, "three", ttl=60)
    assert third is not None and third.generation == 5
    with pytest.raises(leases.LeaseLost):
        leases.renew(second)  # the dead owner cannot come back
    assert leases.latest(fs, d)[1]["owner"] == "three"


@pytest.mark.parametrize("where", ["s3", "local"])
def test_racing_acquirers_exactly_one_wins(s3, tmp_path, where):
    fs, d = (_fs(s3), "lsiq/leases-race/x") if where == "s3" else (fsspec.filesystem("file"), str(tmp_path / "l"))
    for round_ in range(3):
        barrier = threading.Barrier(6)
        won: list[str] = []

        def contender(name: str, barrier: threading.Barrier, won: list[str]) -> None:
            barrier.wait()
            if leases.try_acquire(fs, d, name, ttl=60) is not None:
                won.append(name)

        threads = [threading.Thread(target=contender, args=(f"s{round_}-{i}", barrier, won)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1, won
        gen, rec = leases.latest(fs, d)
        assert rec["owner"] == won[0]
        leases.release(leases.Lease(fs, d, won[0], 60, gen, rec["expires_at"]))


# ----------------------------------------------------------------------------- RUN.yaml


def test_run_yaml_maps_to_quantize_flags(texts_dir):
    argv = quantize_args({"method": "lwc", "wbits": 4, "group_size": 32, "sym": True, "calib": [str(texts_dir / "calib.txt")],
                          "storage-options": {"a": 1}})
    assert argv == ["--method", "lwc", "--wbits", "4", "--group-size", "32", "--sym", "--calib",
                    str(texts_dir / "calib.txt"), "--storage-options", '{"a": 1}']
    with pytest.raises(ValueError, match="unknown setting 'bits'"):
        quantize_args({"bits": 4})
    with pytest.raises(ValueError, match="may not set model, output"):
        quantize_args({"model": "x", "output": "y"})


def test_bad_run_yaml_is_refused(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("method: lsi\nwbits: 3\nbits: 4\n")
    proc = subprocess.run([sys.executable, "-m", "pipeline.schedule", "--source", str(tmp_path), "--output",
                           str(tmp_path / "o"), "--config", str(cfg), "--once"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "unknown setting 'bits'" in proc.stderr
    # credentials in the options would end up on command lines and in Ray job entrypoints
    cfg.write_text("method: lsi\n")
    opts = '{"key": "AKIA-NOT-REAL", "client_kwargs": {"aws_secret_access_key": "not-real"}}'
    proc = subprocess.run([sys.executable, "-m", "pipeline.schedule", "--source", str(tmp_path), "--output",
                           str(tmp_path / "o"), "--config", str(cfg), "--once", "--storage-options", opts],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0 and "holds credentials (key, client_kwargs.aws_secret_access_key)" in proc.stderr
    assert "not-real" not in proc.stderr and "AKIA" not in proc.stderr


# ----------------------------------------------------------------------------- schedulers


def _run_yaml(tmp_path: Path, texts_dir: Path) -> Path:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"method": "lwc", "wbits": 4, "group_size": 32, "nsamples": 4, "seqlen": 32,
                                   "epochs": 1, "calib": [str(texts_dir / "calib.txt")], "num_cpus": 1}))
    return cfg


def _scheduler(s3, cfg: Path, source: str, output: str, owner: str) -> subprocess.Popen:
    env = {**os.environ, **s3.credentials_env()}
    opts = {"client_kwargs": {"endpoint_url": s3.endpoint}}  # credentials come from the environment
    cmd = [sys.executable, "-m", "pipeline.schedule", "--source", source, "--output", output, "--config", str(cfg),
           "--once", "--storage-options", json.dumps(opts), "--owner", owner]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def _summary(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
def test_two_schedulers_quantize_once_and_a_dead_lease_is_taken_over(s3, tiny_checkpoint, texts_dir, tmp_path):
    fs = _fs(s3)
    upload_dir(s3, tiny_checkpoint, "sched/src/run-a/step-100")
    # run-b: config, index and the first shard are there, the second shard is still uploading
    index = json.loads((tiny_checkpoint / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    for name in ["config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", shards[0]]:
        fs.pipe_file(f"lsiq/sched/src/run-b/{name}", (tiny_checkpoint / name).read_bytes())
    cfg = _run_yaml(tmp_path, texts_dir)
    src, out = "s3://lsiq/sched/src", "s3://lsiq/sched/out"

    procs = [_scheduler(s3, cfg, src, out, f"sched-{i}") for i in range(2)]  # side by side
    summaries = [_summary(p) for p in procs]
    quantized = [s for s in summaries if s["quantized"]]
    assert len(quantized) == 1 and quantized[0]["quantized"] == ["run-a/step-100"], summaries
    other = [s for s in summaries if not s["quantized"]][0]
    assert other["leased"] == ["run-a/step-100"] or other["done"] == ["run-a/step-100"], other
    for s in summaries:  # the half-uploaded checkpoint is never picked up
        assert [i["checkpoint"] for i in s["incomplete"]] == ["run-b"] and "missing shard" in s["incomplete"][0]["reason"]
        assert not s["failed"]
    manifest = json.loads(fs.cat_file("lsiq/sched/out/run-a/step-100/lsiq_manifest.json"))
    record = json.loads(fs.cat_file("lsiq/sched/out/run-a/step-100/schedule.json"))
    assert manifest["status"] == "complete" and record["status"] == "complete"
    assert record["owner"] == quantized[0]["owner"]
    assert not fs.exists("lsiq/sched/out/run-b")

    # the upload finishes: the next pass quantizes run-b and skips run-a (same source, same settings)
    fs.pipe_file(f"lsiq/sched/src/run-b/{shards[1]}", (tiny_checkpoint / shards[1]).read_bytes())
    again = _summary(_scheduler(s3, cfg, src, out, "sched-2"))
    assert again["quantized"] == ["run-b"] and again["done"] == ["run-a/step-100"], again
    # with other settings neither counts as done any more (the last pass below requantizes one)
    from pipeline.checkpoint import Checkpoint
    from pipeline.schedule import ScheduleConfig, Scheduler, source_fingerprint

    opts = s3.storage_options()
    run = yaml.safe_load(cfg.read_text())

    def done(settings: dict, rel: str) -> bool:
        sched = Scheduler(ScheduleConfig(source=src, output=out, run=settings, storage_options=opts), log=lambda m: None)
        return sched._complete(rel, source_fingerprint(Checkpoint(f"{src}/{rel}", opts)), sched._record(rel))

    assert done(run, "run-a/step-100") and done(run, "run-b")
    assert not done(run | {"wbits": 3}, "run-a/step-100") and not done(run | {"wbits": 3}, "run-b")
    # new weights under the same names and shapes (a retrained checkpoint): a new source fingerprint
    before = source_fingerprint(Checkpoint(f"{src}/run-b", opts))
    data = bytearray((tiny_checkpoint / shards[1]).read_bytes())
    data[-1] ^= 0x01
    fs.pipe_file(f"lsiq/sched/src/run-b/{shards[1]}", bytes(data))
    assert source_fingerprint(Checkpoint(f"{src}/run-b", opts)) != before
    assert not done(run, "run-b") and done(run, "run-a/step-100")

    # A live scheduler holds run-b's lease; run-a's last owner died holding its lease (its last lease
    # object expired an hour ago). With new settings the next pass leaves run-b to its holder, takes
    # the dead lease over and quantizes run-a again, over its old output (--restart).
    def lease_dir(rel: str) -> str:
        return schedule.lease_dir("lsiq/sched/out", rel)  # the s3fs path of the output root

    live = leases.try_acquire(fs, lease_dir("run-b"), "someone-alive", ttl=3600)
    assert live is not None
    gen, _ = leases.latest(fs, lease_dir("run-a/step-100"))
    fs.pipe_file(f"{lease_dir('run-a/step-100')}/{gen + 1:010d}.json",
                 json.dumps({"owner": "someone-dead", "token": "t", "expires_at": time.time() - 3600,
                             "released": False}).encode())
    cfg.write_text(cfg.read_text().replace("wbits: 4", "wbits: 3"))
    took = _summary(_scheduler(s3, cfg, src, out, "sched-3"))
    assert took["quantized"] == ["run-a/step-100"] and took["leased"] == ["run-b"], took
    manifest = json.loads(fs.cat_file("lsiq/sched/out/run-a/step-100/lsiq_manifest.json"))
    assert manifest["status"] == "complete" and manifest["quantization"]["wbits"] == 3
    assert json.loads(fs.cat_file("lsiq/sched/out/run-a/step-100/schedule.json"))["owner"] == "sched-3"
    assert leases.latest(fs, lease_dir("run-b"))[1]["owner"] == "someone-alive"


def test_a_failed_checkpoint_waits_a_doubling_back_off(tiny_checkpoint, texts_dir, tmp_path):
    """A run that fails (here: a group size that does not divide the tiny model's 64-wide linears,
    which quantize refuses) is recorded as failed with its error; later passes leave the checkpoint
    alone until its back-off runs out, which doubles with each failure of the same checkpoint and
    settings; new settings are tried at once."""
    import shutil

    src, out = tmp_path / "src", tmp_path / "out"
    shutil.copytree(tiny_checkpoint, src / "m")
    run = {"method": "rtn", "wbits": 4, "nsamples": 2, "seqlen": 16, "calib": [str(texts_dir / "calib.txt")]}
    logs: list[str] = []

    def scheduler(group_size: int) -> schedule.Scheduler:
        cfg = schedule.ScheduleConfig(source=str(src), output=str(out), run={**run, "group_size": group_size},
                                      retry_backoff_s=4.0, poll_s=0.2)
        return schedule.Scheduler(cfg, log=logs.append)

    def record() -> dict:
        return json.loads((out / "m" / schedule.RECORD).read_text())

    first = scheduler(48)
    summary = first.pass_once()
    assert [f["checkpoint"] for f in summary["failed"]] == ["m"] and "group size 48" in summary["failed"][0]["reason"]
    rec = record()
    assert rec["status"] == "failed" and rec["failures"] == 1 and "group size 48" in rec["error"]
    assert rec["retry_after"] - rec["failed_at"] == pytest.approx(4.0)
    started = sum("quantizing" in line for line in logs)
    # within the back-off (4 s: these passes take well under a second): not run again, by this
    # scheduler or another one
    for s in (first, scheduler(48)):
        summary = s.pass_once()
        assert summary["failed"] == [] and summary["waiting"][0]["checkpoint"] == "m"
        assert "failed 1 time(s)" in summary["waiting"][0]["reason"] and "group size 48" in summary["waiting"][0]["reason"]
    assert sum("quantizing" in line for line in logs) == started and record() == rec
    time.sleep(max(0.0, rec["retry_after"] - time.time()) + 0.1)
    summary = first.pass_once()  # the back-off ran out: tried again, and it doubles
    assert [f["checkpoint"] for f in summary["failed"]] == ["m"]
    rec = record()
    assert rec["failures"] == 2 and rec["retry_after"] - rec["failed_at"] == pytest.approx(8.0)
    summary = scheduler(40).pass_once()  # other settings: a new configuration, tried at once, counted afresh
    assert [f["checkpoint"] for f in summary["failed"]] == ["m"] and "group size 40" in summary["failed"][0]["reason"]
    assert record()["failures"] == 1
