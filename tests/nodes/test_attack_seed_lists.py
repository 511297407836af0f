"""Attacks on the Sampler's list of seeds: every seed's images equal a run with that seed alone (text-to-image with
a batch and a ControlNet, img2img, inpainting), an empty list is a node input error, a cancel leaves nothing cached,
the disk cache keeps the groups, and a grouped latent keeps decoding per seed after LatentUpscale."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from graphflow import Cancelled, CancelToken, Engine, Graph, NodeExecutionError, ValidationError
from graphflow.events import NodeProgress
from graphflow.models import ModelManager
from nodes import EmptyLatent, LatentUpscale, Sampler, VAEDecode
from tests.nodes.sampling_graphs import STEPS, make_engine, sampling_graph


@pytest.fixture
def engine(tiny_models: Path, tmp_path: Path) -> Engine:
    return make_engine(tiny_models, tmp_path)


def image(engine: Engine, graph: Graph, **options: Any) -> torch.Tensor:
    return engine.run(graph, **options).outputs["image"]


@pytest.mark.parametrize("case", [
    {"latent": "batch"},  # EmptyLatent batch=2, with the Canny ControlNet
    {"init_image": "init.png", "strength": 0.7},
    {"checkpoint": "sd15-inpaint", "init_image": "init.png", "mask_image": "mask.png",
     "mask_to": ("encoder", "sampler")},
    {"init_image": "init.png", "mask_image": "mask.png", "mask_to": ("encoder", "sampler"), "strength": 0.8},
], ids=["batch-control", "img2img", "inpaint-9-channel", "inpaint-4-channel"])
def test_each_seed_of_a_list_gives_the_images_of_that_seed_alone(engine: Engine, tiny_models: Path,
                                                                  case: dict[str, Any]) -> None:
    def graph(seed: int | list[int]) -> Graph:
        extra = dict(case)
        if extra.pop("latent", None):
            extra["latent"] = EmptyLatent(width=64, height=64, batch=2).latent
        return sampling_graph(tiny_models, seed=seed, **extra)

    events: list[Any] = []
    both = image(engine, graph([3, 5]), on_event=events.append)
    alone = [image(engine, graph(3)), image(engine, graph(5))]
    rows = alone[0].shape[0]
    assert both.shape[0] == 2 * rows
    assert torch.equal(both[:rows], alone[0]) and torch.equal(both[rows:], alone[1])
    progress = [(event.step, event.total) for event in events if isinstance(event, NodeProgress)
                and event.node == "sampler"]
    total = progress[-1][1]
    assert progress == [(step, total) for step in range(1, total + 1)] and total % 2 == 0  # one bar, both seeds


def test_a_seed_given_twice_gives_the_same_images_twice(engine: Engine, tiny_models: Path) -> None:
    twice = image(engine, sampling_graph(tiny_models, controls=(), seed=[9, 9]))
    assert torch.equal(twice[:1], twice[1:]) and torch.equal(twice[:1], image(engine, sampling_graph(
        tiny_models, controls=(), seed=9)))


def test_an_empty_list_of_seeds_is_a_node_input_error(engine: Engine, tiny_models: Path) -> None:
    with pytest.raises(NodeExecutionError) as caught:
        engine.run(sampling_graph(tiny_models, controls=(), seed=[]))
    assert caught.value.node == "sampler" and "seed is an empty list" in str(caught.value)
    document = sampling_graph(tiny_models, controls=()).to_document()
    document["params"] = {"seeds": {"type": "INT", "list": True, "default": [1]}}
    document["nodes"]["sampler"]["inputs"]["seed"] = {"param": "seeds"}
    with pytest.raises(NodeExecutionError) as caught:  # through a list param, as `--set seeds=` gives it
        engine.run(document, {"seeds": []})
    assert "seed is an empty list" in str(caught.value)


def test_seed_items_out_of_range_are_refused_before_anything_runs(engine: Engine, tiny_models: Path) -> None:
    document = sampling_graph(tiny_models, controls=()).to_document()
    document["nodes"]["sampler"]["inputs"]["seed"] = [1, -1, 2**64]
    with pytest.raises(ValidationError) as caught:
        engine.compile(document)
    assert [(error.code, error.node, error.input) for error in caught.value.errors] == [
        ("value_out_of_range", "sampler", "seed")] * 2


def test_a_run_cancelled_during_the_second_seed_caches_nothing_of_the_sampler(tiny_models: Path,
                                                                             tmp_path: Path) -> None:
    engine = make_engine(tiny_models, tmp_path)
    graph = sampling_graph(tiny_models, controls=(), seed=[3, 5])
    token = CancelToken()

    def cancel_in_the_second_seed(event: object) -> None:
        if isinstance(event, NodeProgress) and event.node == "sampler" and event.step == STEPS + 1:
            token.cancel()

    with pytest.raises(Cancelled):
        engine.run(graph, on_event=cancel_in_the_second_seed, cancel=token)
    again = engine.run(graph)
    assert {"sampler", "decode"} <= set(again.ran) and "positive" in again.cached
    (tmp_path / "fresh").mkdir()
    reference = make_engine(tiny_models, tmp_path / "fresh")
    assert torch.equal(again.outputs["image"], image(reference, graph))
    assert all(engine.models.holders(key) == 0 for key in engine.models.loaded())


def test_the_disk_cache_keeps_a_latent_with_its_groups(tiny_models: Path, tmp_path: Path) -> None:
    def run() -> Any:  # a new engine and model manager each time: only the disk cache is shared
        graph = sampling_graph(tiny_models, controls=(), seed=[3, 5])
        graph.output("latent", graph["sampler"].latent)
        engine = Engine(input_dirs=[tiny_models], output_dir=tmp_path / "out", disk_cache=tmp_path / "cache",
                        models=ModelManager())
        return engine.run(graph)

    first, second = run(), run()
    assert "sampler" in first.ran and "sampler" in second.cached
    assert second.outputs["latent"].groups == 2 and torch.equal(second.outputs["latent"].samples,
                                                                first.outputs["latent"].samples)
    assert torch.equal(second.outputs["image"], first.outputs["image"])


def _upscaled(tiny_models: Path, seed: int | list[int]) -> Graph:
    graph = sampling_graph(tiny_models, controls=(), seed=seed)
    larger = graph.add(LatentUpscale(latent=graph["sampler"].latent, scale_by=2.0), "upscale")
    graph.output("upscaled", graph.add(VAEDecode(vae=graph["sd"].vae, latent=larger.latent), "decode2").image)
    return graph


def test_an_upscaled_grouped_latent_has_the_images_of_each_seed_in_order(engine: Engine, tiny_models: Path) -> None:
    both = engine.run(_upscaled(tiny_models, [3, 5])).outputs["upscaled"]
    alone = [engine.run(_upscaled(tiny_models, seed)).outputs["upscaled"] for seed in (3, 5)]
    assert both.shape == (2, 128, 128, 3)
    assert (both - torch.cat(alone)).abs().max() < 1e-4  # each row is its seed's, up to the decode's batching


def test_an_upscaled_grouped_latent_still_decodes_each_seed_on_its_own(engine: Engine, tiny_models: Path) -> None:
    both = engine.run(_upscaled(tiny_models, [3, 5])).outputs["upscaled"]
    alone = [engine.run(_upscaled(tiny_models, seed)).outputs["upscaled"] for seed in (3, 5)]
    assert torch.equal(both, torch.cat(alone))


def _hires(tiny_models: Path, seed: int | list[int]) -> Graph:
    """Sample, upscale the latents, sample again from them at strength 0.5 with the same seed(s): a hires fix."""
    graph = sampling_graph(tiny_models, controls=(), seed=seed)
    larger = graph.add(LatentUpscale(latent=graph["sampler"].latent, scale_by=2.0), "upscale")
    again = graph.add(Sampler(model=graph["sd"].model, positive=graph["positive"].conditioning, latent=larger.latent,
                              seed=seed, steps=2, strength=0.5), "refine")
    graph.output("refined", graph.add(VAEDecode(vae=graph["sd"].vae, latent=again.latent), "decode2").image)
    return graph


def test_a_hires_fix_with_a_list_of_seeds_refines_each_seed_with_its_own_seed(engine: Engine,
                                                                               tiny_models: Path) -> None:
    both = engine.run(_hires(tiny_models, [3, 5])).outputs["refined"]
    alone = [engine.run(_hires(tiny_models, seed)).outputs["refined"] for seed in (3, 5)]
    assert both.shape == (2, 128, 128, 3) and torch.equal(both, torch.cat(alone))


def test_one_seed_and_a_list_of_that_one_seed_are_the_same_result(engine: Engine, tiny_models: Path) -> None:
    first = engine.run(sampling_graph(tiny_models, controls=(), seed=7))
    listed = engine.run(sampling_graph(tiny_models, controls=(), seed=[7]))
    assert listed.ran == [] and torch.equal(listed.outputs["image"], first.outputs["image"])  # one cache key


def test_a_grouped_latent_takes_one_seed_for_its_whole_batch_and_refuses_another_count(engine: Engine,
                                                                                         tiny_models: Path) -> None:
    def refine(seeds: list[int]) -> Graph:
        graph = sampling_graph(tiny_models, controls=(), seed=[3, 5])
        again = graph.add(Sampler(model=graph["sd"].model, positive=graph["positive"].conditioning,
                                  latent=graph["sampler"].latent, seed=seeds, steps=2, strength=0.5), "refine")
        graph.output("refined", graph.add(VAEDecode(vae=graph["sd"].vae, latent=again.latent), "decode2").image)
        return graph

    assert engine.run(refine([1])).outputs["refined"].shape[0] == 2  # one seed: the batch of both at once
    assert engine.run(refine([1, 2])).outputs["refined"].shape[0] == 2  # a seed per group
    with pytest.raises(NodeExecutionError) as caught:
        engine.run(refine([1, 2, 4]))
    assert caught.value.node == "refine" and "give 2 seeds" in str(caught.value)
