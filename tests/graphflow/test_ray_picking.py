"""How the Ray backend picks an idle actor's next job (no cluster needed): its models first, then shared node keys,
then models no other actor holds, then order; the last jobs of models another actor holds are left to it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="the Ray backend needs the graphflow[ray] extra")

from graphflow import Engine
from graphflow.ray_backend import RayBackend, _Slot
from graphflow.sweep_runner import Job

A, B, CN = "checkpoint-a", "checkpoint-b", "controlnet"


def _jobs(*models: str) -> tuple[list[Job], dict[int, tuple[frozenset[str], frozenset[str]]]]:
    jobs = [Job(index, {}, f"{index:04d}") for index in range(len(models))]
    routes = {index: (frozenset({model, CN}), frozenset({model, CN, f"prompt-{model}", f"seed-{index}"}))
              for index, model in enumerate(models)}
    return jobs, routes


def _run_in_lockstep(models: tuple[str, ...], actors: int) -> list[tuple[int, int]]:
    jobs, routes = _jobs(*models)
    slots = [_Slot(index, None) for index in range(actors)]
    pending, handed = list(jobs), []
    while pending:
        for slot in slots:
            job = RayBackend._pick(pending, slot, slots, routes) if pending else None
            if job is not None:
                pending.remove(job)
                slot.models |= routes[job.index][0]
                slot.keys |= routes[job.index][1]
                handed.append((slot.index, job.index))
    return handed


def test_two_checkpoints_on_two_actors_keep_one_checkpoint_each() -> None:
    handed = _run_in_lockstep((A, A, A, A, B, B, B, B), 2)
    assert [job for slot, job in handed if slot == 0] == [0, 1, 2, 3]
    assert [job for slot, job in handed if slot == 1] == [4, 5, 6, 7]


def test_an_actor_holding_the_models_is_preferred_then_shared_keys() -> None:
    jobs, routes = _jobs(A, B, A)
    holder = _Slot(0, None, models={A, CN}, keys={A, CN, f"prompt-{A}", "seed-2"})
    other = _Slot(1, None)
    assert RayBackend._pick(jobs, holder, [holder, other], routes) == jobs[2]  # its models and a shared seed key
    assert RayBackend._pick(jobs, other, [holder, other], routes) == jobs[1]  # the checkpoint nobody holds


def test_an_actor_warm_with_other_models_leaves_the_last_job_of_anothers_but_takes_a_backlog() -> None:
    jobs, routes = _jobs(A, A, A)
    busy = _Slot(0, None, models={A, CN}, job=jobs[0])
    idle = _Slot(1, None, models={B, CN})
    assert RayBackend._pick(jobs[2:], idle, [busy, idle], routes) is None  # one left: the holder takes it next
    assert RayBackend._pick(jobs[1:], idle, [busy, idle], routes) == jobs[1]  # two waiting: worth loading A too
    cold = _Slot(2, None)
    assert RayBackend._pick(jobs[2:], cold, [busy, cold], routes) == jobs[2]  # loading beside the holder: no loss
    busy.dead = True
    assert RayBackend._pick(jobs[2:], idle, [busy, idle], routes) == jobs[2]  # a dead holder holds nothing



def test_jobs_are_routed_by_model_keys_even_for_models_the_driver_does_not_have(tmp_path: Path) -> None:
    """A cluster's models may live on its machines only: the driver keys them by their sources as written."""
    template = tmp_path / "t.json"
    template.write_text(json.dumps({"graphflow": 1, "params": {"checkpoint": {"type": "STRING", "default": "x"}},
                                    "nodes": {"sd": {"type": "CheckpointLoader",
                                                     "inputs": {"model": {"param": "checkpoint"}}}},
                                    "outputs": {"model": "sd.model"}}))
    backend = RayBackend(engine=Engine(input_dirs=[tmp_path]))
    routes = [backend._route(template, Job(index, {"checkpoint": source}, f"{index:04d}"))
              for index, source in enumerate([str(tmp_path / "on-the-cluster"), "org/on-the-hub", "org/on-the-hub"])]
    assert all(len(models) == 1 for models, _ in routes)
    assert routes[0][0] != routes[1][0] and routes[1] == routes[2]
