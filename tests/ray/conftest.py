"""A real two-raylet Ray cluster on this machine (ray.cluster_utils.Cluster), one CPU each, for the Ray backend's
tests. Only inside the loopback-only network namespace tests/graphflow/test_ray_namespace.py makes: outside it Ray
probes cloud-metadata addresses, which hang here."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if os.environ.get("GRAPHFLOW_RAY_NAMESPACE") == "1":
        return
    skip = pytest.mark.skip(reason="the Ray tests run inside a loopback-only network namespace: "
                                   "run tests/graphflow/test_ray_namespace.py")
    for item in items:
        if Path(__file__).parent in Path(str(item.fspath)).parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cluster(tiny_models: Path) -> Iterator[Any]:
    """Two raylets of one CPU each, the driver connected; the tiny models' folder in the workers' environment."""
    os.environ["GRAPHFLOW_TINY_MODELS"] = str(tiny_models)  # before the raylets start: their workers inherit it
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray
    from ray.cluster_utils import Cluster

    local = {"num_cpus": 1, "node_ip_address": "127.0.0.1"}
    cluster = Cluster(initialize_head=True, head_node_args={**local, "include_dashboard": False})
    cluster.add_node(**local)
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()
