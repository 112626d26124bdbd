"""Connecting to Ray: an existing cluster (``--address`` / RAY_ADDRESS) or an embedded local one
bound to 127.0.0.1."""

from __future__ import annotations

import os

import ray


def connect(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect or start Ray; returns True if this call started or joined it (and should shut it down)."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # address="local": always a new embedded instance, never a cluster that `ray start` left running
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=True, configure_logging=False)
    return True


def cluster_gpus() -> int:
    return int(ray.cluster_resources().get("GPU", 0))


def node_cpus() -> int:
    """CPUs of the largest alive node: an actor must fit on one node."""
    cpus = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    return max(1, int(max(cpus, default=1)))
