"""The embedded local Ray listens on loopback only."""

import os

from tests.procs import LOOPBACK, listening_ips


def test_embedded_ray_listens_on_loopback_only(ray_local):
    import ray

    ray.get(ray.remote(lambda: 1).remote())  # a worker process is up
    addresses = listening_ips(os.getpid())
    assert addresses and addresses <= LOOPBACK, addresses
    assert ray.util.get_node_ip_address() == "127.0.0.1"
