"""Runs the Ray backend's tests (tests/ray) on a real local Ray cluster inside a loopback-only network namespace.

Why a namespace: Ray's default start-up probes cloud-metadata and external addresses even with usage stats off,
and on this kind of machine (no network beyond the package registries) each probe hangs; inside `unshare -n` with
only `lo` up every probe fails at once, and nothing of the cluster can be reached from outside.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="the Ray tests need the graphflow[ray] extra")
ROOT = Path(__file__).resolve().parents[2]


def _can_unshare() -> bool:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    probe = subprocess.run(["unshare", "-n", "ip", "link", "set", "lo", "up"], capture_output=True, check=False)
    return probe.returncode == 0


def test_the_ray_tests_pass_inside_a_loopback_only_namespace() -> None:
    if not _can_unshare():
        pytest.skip("needs `unshare -n` (root, or user namespaces) and iproute2's `ip`")
    env = {**os.environ, "GRAPHFLOW_RAY_NAMESPACE": "1", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    # -o addopts= drops the project's -q, so the summary line ("N passed") is printed
    script = f"ip link set lo up && exec {sys.executable} -m pytest -q -o addopts= -p no:cacheprovider tests/ray"
    done = subprocess.run(["unshare", "-n", "sh", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900, check=False)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout, done.stdout[-2000:]
