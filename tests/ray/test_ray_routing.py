"""Routing on a real two-raylet cluster: with two checkpoints and two fresh actors, each actor keeps to one
(graphflow/test_ray_picking.py checks the choices one by one)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from graphflow import Engine
from graphflow.sweep_runner import run_sweep
from tests.ray.test_ray_backend import CANNY, FIXED, ROOT, _batch


def test_jobs_go_to_the_actor_that_holds_their_models(cluster: Any, tiny_models: Path, tmp_path: Path) -> None:
    other = tmp_path / "models/another-sd15"
    shutil.copytree(tiny_models / "sd15", other)
    engine = Engine(input_dirs=[ROOT, tmp_path])
    from graphflow.ray_backend import RayBackend

    routed = RayBackend(engine=engine, threads=1)  # fresh actors: nothing loaded yet
    try:
        checkpoints = ["tiny:sd15", str(other)]
        batch = _batch([f"checkpoint={json.dumps(checkpoints)}", "seed=0..1"],
                       fixed=[item for item in FIXED if not item.startswith("checkpoint=")])
        result = run_sweep(CANNY, batch, tmp_path / "out", backend=routed)
        assert len(result.jobs) == 4
        for counts in routed.model_loads():
            unets = [key for key in counts if key.startswith("unet ")]
            assert len(unets) == 1 and counts[unets[0]] == 1, counts  # each actor kept to one checkpoint
    finally:
        routed.close()
