"""Real renders from many threads against one Engine equal the same renders run one after the other, bit for bit.

Every thread shares one Engine and one model manager: models load once, shared nodes (loaders, prompts, the
control image) run once, and each thread's samples (its own seed, scheduler, ControlNet or img2img strength) are
the pixels a sequential run gives.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from tests.nodes.sampling_graphs import CANNY, Control, make_engine, sampling_graph

JOBS: list[dict[str, Any]] = [
    {"seed": 1},
    {"seed": 2, "scheduler": "euler_a"},
    {"seed": 3, "controls": (CANNY, Control("controlnet-depth", "depth.png", 0.7))},
    {"seed": 4, "controls": (), "init_image": "init.png", "strength": 0.6},
    {"seed": 5, "checkpoint": "sdxl", "controls": (Control("controlnet-sdxl", "edges.png", 0.5),)},
    {"seed": 6, "controls": (Control("controlnet-pose", "pose.png", 1.0, 0.0, 0.5),), "scheduler": "ddim"},
]


def render(engine: Any, tiny_models: Path, job: dict[str, Any]) -> torch.Tensor:
    return engine.run(sampling_graph(tiny_models, **job)).outputs["image"]


def test_renders_from_many_threads_equal_sequential_renders(tiny_models: Path, tmp_path: Path) -> None:
    (tmp_path / "sequential").mkdir()
    (tmp_path / "shared").mkdir()
    sequential = make_engine(tiny_models, tmp_path / "sequential")
    expected = [render(sequential, tiny_models, job) for job in JOBS]
    shared = make_engine(tiny_models, tmp_path / "shared")
    jobs = JOBS * 2  # every job twice, at once: the second of each reuses or waits for the first
    with ThreadPoolExecutor(len(jobs)) as pool:
        images = list(pool.map(lambda job: render(shared, tiny_models, job), jobs))
    for index, image in enumerate(images):
        assert torch.equal(image, expected[index % len(JOBS)]), jobs[index]
    assert max(shared.models.loads.values()) == 1  # each model loaded once, however many threads asked
    assert shared.models.loads.keys() == sequential.models.loads.keys()
