"""Process helpers for tests: what a process tree listens on (everything Ray starts must bind to
loopback only), and a run started beside another."""

from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path

import psutil

LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1"}


def listening_ips(root_pid: int) -> set[str]:
    """IP addresses that ``root_pid`` and all its descendants listen on (TCP/UDP, IPv4 and IPv6)."""
    ips = set()
    root = psutil.Process(root_pid)
    for p in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            ips |= {c.laddr.ip for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
    return ips


def start_beside(cmd: list[str], log: Path, env: dict[str, str], ready: str = "lsiq: ",
                 timeout: float = 300) -> subprocess.Popen:
    """Start ``cmd`` in its own session, its output in ``log``, and return once it has printed
    ``ready`` (pipeline.quantize prints its "lsiq: ..." line once its embedded Ray is up), so that a
    run started next does not start its Ray node at the same moment: two nodes starting at once on
    two loaded cores can time out. Kill it with os.killpg(proc.pid, ...)."""
    out = log.open("w")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    out.close()
    deadline = time.monotonic() + timeout
    while ready not in log.read_text():
        if proc.poll() is not None:
            raise RuntimeError(f"{' '.join(cmd[:3])} exited with {proc.returncode} before it was ready:\n"
                               f"{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError(f"not ready after {timeout} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    return proc
