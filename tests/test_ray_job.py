"""The real CLI as a Ray job: `ray start --head` on 127.0.0.1, then `ray job submit --working-dir <repo>`.

The head runs with its own --temp-dir and free ports, so it never meets another Ray instance on the machine, and its
address file (ray_current_cluster) lives in that temp dir, where no plain ray.init() looks. It is started with
--block and stopped by killing its process tree by PID: `ray stop` is not used because it kills every Ray process of
the machine, including other sessions' clusters.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from tests.procs import LOOPBACK, listening_ips

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray")) if Path(sys.executable).with_name("ray").exists() else "ray"


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _kill_tree(root_pid: int, marker: str) -> None:
    """SIGTERM, then SIGKILL, the process tree of ``root_pid`` and any process whose command line names ``marker``."""
    procs: dict[int, psutil.Process] = {}
    with contextlib.suppress(psutil.NoSuchProcess):
        root = psutil.Process(root_pid)
        procs[root.pid] = root
        procs.update({p.pid: p for p in root.children(recursive=True)})
    for p in psutil.process_iter(["cmdline"]):
        if any(a == marker or a.endswith("=" + marker) or marker + os.sep in a for a in p.info["cmdline"] or []):
            procs[p.pid] = p
    procs.pop(os.getpid(), None)
    for p in procs.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(list(procs.values()), timeout=3)  # then SIGKILL: some Ray processes ignore SIGTERM
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=10)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    # A short temp dir: Ray's unix sockets live under it and must fit in 107 bytes (pytest's tmp_path is too long).
    temp_dir = tempfile.mkdtemp(prefix="lsiqray-", dir="/tmp")
    gcs, dash, client, agent_http, agent_grpc, metrics = _free_ports(6)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # Ray turns --node-ip-address 127.0.0.1 into the machine's routable IP and listens there; with "cluster mode" off
    # (what it does on macOS and Windows) the node IP stays 127.0.0.1 and every port listens on loopback only.
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_UV_RUN_RUNTIME_ENV="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    # Token auth with a token of our own, passed to the head and the CLI (not ~/.ray/auth_token, which may be absent).
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    cmd = [RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
           "--port", str(gcs), "--dashboard-port", str(dash), "--num-cpus", "2", "--disable-usage-stats",
           "--temp-dir", temp_dir, "--ray-client-server-port", str(client),
           "--dashboard-agent-listen-port", str(agent_http), "--dashboard-agent-grpc-port", str(agent_grpc),
           "--metrics-export-port", str(metrics), "--block"]
    log = tmp_path_factory.mktemp("ray-head") / "ray-start.log"
    with open(log, "w") as fh:
        head = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if head.poll() is not None:
                pytest.fail(f"ray start exited with {head.returncode}:\n{log.read_text()[-4000:]}")
            try:
                urllib.request.urlopen(f"{url}/api/version", timeout=2).close()
                break
            except urllib.error.HTTPError:
                break  # it answers (401 without Ray's auth token, which the ray CLI sends)
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the Ray dashboard at {url} did not come up in 120 s:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        yield url, env, head.pid
    finally:
        _kill_tree(head.pid, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(url: str, env: dict[str, str], job_id: str, entrypoint: list[str], timeout: int) -> subprocess.CompletedProcess:
    # clusters/runtime-env.yaml brings the excludes and env vars; --working-dir names the repo root.
    runtime_env = yaml.safe_load((REPO / "clusters" / "runtime-env.yaml").read_text())
    runtime_env.pop("working_dir")
    cmd = [RAY, "job", "submit", "--address", url, "--submission-id", job_id, "--working-dir", str(REPO),
           "--runtime-env-json", json.dumps(runtime_env), "--", *entrypoint]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ray_job_submit_quantizes(ray_head, tiny_checkpoint, texts_dir, tmp_path):
    url, env, head_pid = ray_head

    # What the job sees: the uploaded copy of the repo (not the editable install), without the big ignored dirs.
    code = ("import json, os, pipeline; print('PROBE', json.dumps([pipeline.__file__, sorted(os.listdir('.')), "
            "os.environ.get('RAY_ENABLE_UV_RUN_RUNTIME_ENV')]))")
    probe = _submit(url, env, "lsiq-probe", ["python", "-c", code], timeout=300)
    assert probe.returncode == 0, probe.stdout[-4000:] + probe.stderr[-4000:]
    line = next(ln for ln in probe.stdout.splitlines() if ln.startswith("PROBE "))
    pipeline_file, listing, uv_flag = json.loads(line[len("PROBE "):])
    assert not pipeline_file.startswith(str(REPO) + os.sep), pipeline_file
    assert {"pipeline", "lsiq", "pyproject.toml"} <= set(listing)
    assert not {"fixtures", "runs", "bench_out", ".git"} & set(listing), listing
    assert uv_flag == "0"

    out, report = tmp_path / "out", tmp_path / "r.json"
    t0 = time.monotonic()
    job_id = "lsiq-quantize"
    cli = ["python", "-m", "pipeline.quantize", "--model", str(tiny_checkpoint), "--output", str(out),
           "--calib", str(texts_dir / "calib.txt"), "--method", "rtn", "--group-size", "32",
           "--nsamples", "2", "--seqlen", "16", "--report", str(report)]
    job = _submit(url, env, job_id, cli, timeout=600)
    print(f"ray job submit: {time.monotonic() - t0:.1f}s")
    assert job.returncode == 0, job.stdout[-6000:] + job.stderr[-6000:]
    manifest = json.loads((out / "lsiq_manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert json.loads(report.read_text())["blocks"]

    logs = subprocess.run([RAY, "job", "logs", "--address", url, job_id], env=env, capture_output=True, text=True,
                          timeout=60)
    assert logs.returncode == 0, logs.stderr
    assert "block 3/3" in logs.stdout, logs.stdout[-4000:]
    status = subprocess.run([RAY, "job", "status", "--address", url, job_id], env=env, capture_output=True, text=True,
                            timeout=60)
    plain = re.sub(r"\x1b\[[0-9;]*m", "", status.stdout)  # drop the CLI's colours
    assert f"Job '{job_id}' succeeded" in plain, plain[-2000:]
    listening = listening_ips(head_pid)
    assert listening and listening <= LOOPBACK, listening


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_schedule_submits_ray_jobs(ray_head, tiny_checkpoint, texts_dir, tmp_path):
    """pipeline.schedule --address: each new checkpoint becomes a Ray job through the Jobs SDK."""
    url, env, _ = ray_head
    shutil.copytree(tiny_checkpoint, tmp_path / "src" / "m")
    runtime_env = yaml.safe_load((REPO / "clusters" / "runtime-env.yaml").read_text()) | {"working_dir": str(REPO)}
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"method": "rtn", "group_size": 32, "nsamples": 2, "seqlen": 16,
                                   "calib": [str(texts_dir / "calib.txt")], "runtime_env": runtime_env}))
    cmd = [sys.executable, "-m", "pipeline.schedule", "--source", str(tmp_path / "src"), "--output",
           str(tmp_path / "out"), "--config", str(cfg), "--once", "--address", url]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["quantized"] == ["m"], summary
    record = json.loads((tmp_path / "out" / "m" / "schedule.json").read_text())
    assert record["status"] == "complete" and record["run"].startswith("ray job lsiq-"), record
    assert json.loads((tmp_path / "out" / "m" / "lsiq_manifest.json").read_text())["status"] == "complete"
    again = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert json.loads(again.stdout.strip().splitlines()[-1])["done"] == ["m"]
