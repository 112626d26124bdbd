"""What a process tree listens on: tests check that everything Ray starts binds to loopback only."""

from __future__ import annotations

import contextlib

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
