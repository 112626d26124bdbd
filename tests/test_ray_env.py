"""The embedded local Ray listens on loopback only."""

import os

import psutil


def test_embedded_ray_listens_on_loopback_only(ray_local):
    import ray

    ray.get(ray.remote(lambda: 1).remote())  # a worker process is up
    ours = {p.pid for p in psutil.Process(os.getpid()).children(recursive=True)} | {os.getpid()}
    addresses = {c.laddr.ip for c in psutil.net_connections("inet") if c.status == psutil.CONN_LISTEN and c.pid in ours}
    assert addresses and addresses <= {"127.0.0.1", "::ffff:127.0.0.1"}, addresses
    assert ray.util.get_node_ip_address() == "127.0.0.1"
