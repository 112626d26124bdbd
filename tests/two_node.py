"""Run the pipeline on a local two-node Ray cluster (ray.cluster_utils.Cluster, both nodes on
127.0.0.1, one CPU each), two calibrator workers: one per node. Used by tests/test_parallel.py in
a fresh process, since a pytest process may already hold an embedded Ray.

    python -m tests.two_node MODEL OUTPUT CALIB.txt     # prints the report's JSON on the last line
"""

from __future__ import annotations

import json
import os
import sys


def main(model: str, output: str, calib: str) -> int:
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # keep every node on loopback (see pipeline/ray_env.py)
    import ray
    from ray.cluster_utils import Cluster

    ray._private.ray_constants.ENABLE_RAY_CLUSTER = False
    from pipeline.driver import run
    from tests.procs import listening_ips
    from tests.test_pipeline import _cfg

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1",
                                                            "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        report = run(_cfg(model, output, calib, workers=2, cpus_per_worker=1, address=cluster.address),
                     log=lambda m: print(m, file=sys.stderr))
        # this process and every one it started (both nodes' raylets, the GCS, the workers)
        listening = listening_ips(os.getpid())
    finally:
        cluster.shutdown()
    print(json.dumps({"worker_nodes": report["worker_nodes"], "blocks": report["blocks"], "listening": sorted(listening)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:4]))
