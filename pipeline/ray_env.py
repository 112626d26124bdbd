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
        # Ray's "cluster mode" replaces 127.0.0.1 with the machine's routable address and listens on all
        # interfaces; an embedded single-node instance needs none of that (Ray turns it off on macOS and
        # Windows the same way), so every port stays on loopback.
        # The environment variable reaches the processes Ray starts; the driver read it at import, so its
        # copy of the constant is set too (a private module, checked in tests/test_ray_env.py).
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        ray._private.ray_constants.ENABLE_RAY_CLUSTER = False
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
