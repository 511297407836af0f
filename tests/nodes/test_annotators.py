"""controlnet_aux detectors as nodes, offline: the weight-free ones, and weighted ones on random weights the test
writes in the package's own formats, loaded through the real from_pretrained code."""

from __future__ import annotations

import pathlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from graphflow import Engine
from graphflow.context import RunContext
from graphflow.errors import NodeExecutionError
from graphflow.models import ModelManager
from graphflow.models.sources import ModelNotFoundError
from graphflow.paths import PathPolicy
from nodes.annotators import (
    ContentShuffle,
    Lineart,
    LineartStandard,
    PidiNet,
    WeightsRefusedError,
    load_detector,
)
from tests.nodes.calls import run_node
from tests.nodes.test_preprocess import photo_like

controlnet_aux = pytest.importorskip("controlnet_aux")


def as_uint8(image: torch.Tensor) -> np.ndarray:
    return np.round(image.numpy() * 255).astype(np.uint8)


def random_weights(network: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights with some spread, so that the maps are not blank (fresh init often saturates)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return network.eval()


@pytest.fixture(scope="module")
def annotators(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder laid out like lllyasviel/Annotators with PiDiNet's and Lineart's files, holding random weights."""
    from controlnet_aux.lineart import Generator
    from controlnet_aux.pidi.model import pidinet

    folder = tmp_path_factory.mktemp("models") / "annotators"
    folder.mkdir()
    torch.save({"state_dict": random_weights(pidinet(), 1).state_dict()}, folder / "table5_pidinet.pth")
    torch.save(random_weights(Generator(3, 1, 3), 2).state_dict(), folder / "sk_model.pth")
    torch.save(random_weights(Generator(3, 1, 3), 3).state_dict(), folder / "sk_model2.pth")
    return folder


@pytest.fixture
def model_ctx(ctx: RunContext, annotators: Path) -> RunContext:
    ctx.paths = PathPolicy.create([*ctx.paths.input_roots, annotators.parent], ctx.paths.output_root)
    ctx.models = ModelManager()
    return ctx


def test_content_shuffle_is_controlnet_aux_seeded_and_leaves_numpy_random_alone(ctx: RunContext) -> None:
    image = photo_like(2, 48, 40)
    np.random.seed(123)
    before = np.random.get_state()[1].copy()

    maps = run_node(ContentShuffle, ctx, image=image, detect_resolution=64, image_resolution=128, granularity=32,
                    seed=7)["image"]

    assert np.array_equal(np.random.get_state()[1], before)
    detector = controlnet_aux.ContentShuffleDetector()
    for index in range(2):
        np.random.seed(7)
        expected = detector(as_uint8(image[index]), f=32, detect_resolution=64, image_resolution=128,
                            output_type="np")
        # sized as controlnet_aux sizes: 48x40 -> 76.8x64 at detection, rounded to 64x64, then scaled to 128
        assert maps.shape[1:] == expected.shape == (128, 128, 3)
        np.testing.assert_array_equal(as_uint8(maps[index]), expected)
    other = run_node(ContentShuffle, ctx, image=image, detect_resolution=64, image_resolution=128, granularity=32,
                     seed=8)["image"]
    assert not torch.equal(maps, other)


def _shuffled_by_controlnet_aux(image: np.ndarray, seed: int, **arguments: int) -> np.ndarray:
    np.random.seed(seed)  # how controlnet_aux's detector is made reproducible: the global generator
    return controlnet_aux.ContentShuffleDetector()(image, output_type="np", **arguments)


@pytest.mark.parametrize(("rows", "columns", "detect", "resolution", "granularity", "seed"), [
    (48, 40, 64, 128, 32, 0), (100, 60, 128, 64, 8, 2**32 - 1), (64, 64, 64, 64, 256, 12345), (37, 91, 96, 192, 17, 5),
])
def test_content_shuffle_maps_are_pixel_equal_to_controlnet_aux_seeded_globally(
        ctx: RunContext, rows: int, columns: int, detect: int, resolution: int, granularity: int, seed: int) -> None:
    image = photo_like(1, rows, columns)

    shuffled = run_node(ContentShuffle, ctx, image=image, detect_resolution=detect, image_resolution=resolution,
                        granularity=granularity, seed=seed)["image"]

    expected = _shuffled_by_controlnet_aux(as_uint8(image[0]), seed, f=granularity, detect_resolution=detect,
                                           image_resolution=resolution)
    np.testing.assert_array_equal(as_uint8(shuffled[0]), expected)


def test_content_shuffles_on_many_threads_do_not_disturb_each_other(ctx: RunContext) -> None:
    import threading

    image = photo_like(1, 48, 48)
    expected = {seed: _shuffled_by_controlnet_aux(as_uint8(image[0]), seed, f=16, detect_resolution=64,
                                                  image_resolution=64) for seed in range(8)}
    start, stop = threading.Barrier(9), threading.Event()
    maps: dict[int, list[np.ndarray]] = {seed: [] for seed in range(8)}

    def shuffle(seed: int) -> None:
        start.wait()
        for _ in range(5):
            result = run_node(ContentShuffle, ctx, image=image, detect_resolution=64, image_resolution=64,
                              granularity=16, seed=seed)["image"]
            maps[seed].append(as_uint8(result[0]))

    def reseed() -> None:  # other code in the process drawing from numpy's global generator meanwhile
        start.wait()
        while not stop.is_set():
            np.random.seed(99)
            np.random.uniform(size=100)

    threads = [threading.Thread(target=shuffle, args=(seed,)) for seed in range(8)]
    meddler = threading.Thread(target=reseed)
    for thread in [*threads, meddler]:
        thread.start()
    for thread in threads:
        thread.join()
    stop.set()
    meddler.join()
    for seed in range(8):
        assert len(maps[seed]) == 5
        for shuffled in maps[seed]:
            np.testing.assert_array_equal(shuffled, expected[seed])


@pytest.mark.parametrize("sigma, threshold", [(6.0, 8), (2.0, 0)])
def test_lineart_standard_is_controlnet_aux_at_the_input_size(ctx: RunContext, sigma: float, threshold: int) -> None:
    image = photo_like(1, 40, 56)

    lines = run_node(LineartStandard, ctx, image=image, detect_resolution=64, gaussian_sigma=sigma,
                     intensity_threshold=threshold)["image"]

    expected = controlnet_aux.LineartStandardDetector()(as_uint8(image[0]), guassian_sigma=sigma,
                                                        intensity_threshold=threshold, detect_resolution=64,
                                                        output_type="np")
    assert lines.shape == (1, 40, 56, 3) and expected.any()
    np.testing.assert_array_equal(as_uint8(lines[0]), expected)


def reference(detector_class: str, folder: Path, image: torch.Tensor, **arguments: object) -> np.ndarray:
    detector = getattr(controlnet_aux, detector_class).from_pretrained(str(folder))
    return detector(as_uint8(image), output_type="np", **arguments)


@pytest.mark.parametrize("options", [{}, {"safe": True}, {"scribble": True}, {"apply_filter": True}])
def test_pidinet_from_a_local_folder_is_controlnet_aux(model_ctx: RunContext, annotators: Path, options: dict) -> None:
    image = photo_like(1, 48, 64)

    edges = run_node(PidiNet, model_ctx, image=image, model=str(annotators), detect_resolution=128,
                     image_resolution=128, **options)["image"]

    expected = reference("PidiNetDetector", annotators, image[0], detect_resolution=128, image_resolution=128,
                         **options)
    assert edges.shape[1:] == expected.shape == (128, 192, 3)
    assert len(np.unique(expected)) > 1
    np.testing.assert_array_equal(as_uint8(edges[0]), expected)


@pytest.mark.parametrize("coarse", [False, True])
def test_lineart_loads_both_of_its_models(model_ctx: RunContext, annotators: Path, coarse: bool) -> None:
    image = photo_like(1, 64, 64)

    lines = run_node(Lineart, model_ctx, image=image, model=str(annotators), detect_resolution=64,
                     image_resolution=64, coarse=coarse)["image"]

    expected = reference("LineartDetector", annotators, image[0], coarse=coarse, detect_resolution=64,
                         image_resolution=64)
    np.testing.assert_array_equal(as_uint8(lines[0]), expected)
    other = reference("LineartDetector", annotators, image[0], coarse=not coarse, detect_resolution=64,
                      image_resolution=64)
    assert not np.array_equal(expected, other)


def test_a_detector_loads_once_across_runs_and_images(tmp_path: Path, annotators: Path) -> None:
    from PIL import Image

    manager = ModelManager()
    engine = Engine(input_dirs=[tmp_path, annotators.parent], models=manager)
    for seed in (1, 2):
        Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32, 3), np.uint8)).save(tmp_path / "p.png")
        engine.run({"graphflow": 1, "nodes": {
            "photo": {"type": "LoadImage", "inputs": {"path": "p.png"}},
            "edges": {"type": "PidiNet", "inputs": {"image": {"from": "photo.image"}, "model": str(annotators),
                                                    "detect_resolution": 64, "image_resolution": 64}},
        }, "outputs": {"edges": "edges.image"}})
    assert [key.kind for key in manager.loads] == ["annotator:PidiNet"] and sum(manager.loads.values()) == 1


def test_weights_missing_from_the_cache_name_the_repository_file_cache_and_a_local_copy(
        model_ctx: RunContext) -> None:
    from huggingface_hub import constants

    with pytest.raises(ModelNotFoundError) as raised:
        run_node(PidiNet, model_ctx, image=photo_like(1, 16, 16))
    message = str(raised.value)
    assert "'lllyasviel/Annotators'" in message and "table5_pidinet.pth" in message
    assert constants.HF_HUB_CACHE in message and "--input-dir" in message


def test_weights_in_the_hugging_face_cache_are_used_offline(model_ctx: RunContext, annotators: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--someone--annotators"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "table5_pidinet.pth").write_bytes((annotators / "table5_pidinet.pth").read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    image = photo_like(1, 32, 32)

    edges = run_node(PidiNet, model_ctx, image=image, model="someone/annotators", detect_resolution=64,
                     image_resolution=64)["image"]

    expected = reference("PidiNetDetector", annotators, image[0], detect_resolution=64, image_resolution=64)
    np.testing.assert_array_equal(as_uint8(edges[0]), expected)
    assert [key.source.split("@")[0] for key in model_ctx.models.loads] == ["someone/annotators"]


class _Payload:
    """Unpickling this runs code: it touches a file. The weights-only unpickler must refuse it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return pathlib.Path.touch, (self.marker,)


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path: Path) -> None:
    from controlnet_aux.pidi.model import pidinet

    marker = tmp_path / "ran"
    torch.save({"state_dict": pidinet().state_dict(), "extra": _Payload(marker)}, tmp_path / "table5_pidinet.pth")

    with pytest.raises(Exception, match=r"[Ww]eights only load failed"):
        load_detector(PidiNet.spec, tmp_path)
    assert not marker.exists()


def test_annotators_refuse_to_load_when_torch_is_told_to_unpickle_fully(model_ctx: RunContext, annotators: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(WeightsRefusedError, match="TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
        run_node(PidiNet, model_ctx, image=photo_like(1, 16, 16), model=str(annotators))


def test_a_failing_detector_reports_its_node(tmp_path: Path) -> None:
    from PIL import Image

    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "p.png")
    document = {"graphflow": 1, "nodes": {
        "photo": {"type": "LoadImage", "inputs": {"path": "p.png"}},
        "pose": {"type": "OpenPose", "inputs": {"image": {"from": "photo.image"}, "model": "nobody/no-annotators"}},
    }, "outputs": {"pose": "pose.image"}}
    with pytest.raises(NodeExecutionError, match=r"node 'pose' \(OpenPose\).*nobody/no-annotators"):
        Engine(input_dirs=[tmp_path], models=ModelManager()).run(document)


def test_listing_and_validating_nodes_imports_no_heavy_library(tmp_path: Path) -> None:
    graph = tmp_path / "g.json"
    graph.write_text('{"graphflow": 1, "nodes": {"photo": {"type": "LoadImage", "inputs": {"path": "g.json"}}, '
                     '"pose": {"type": "OpenPose", "inputs": {"image": {"from": "photo.image"}}}, '
                     '"depth": {"type": "Depth", "inputs": {"image": {"from": "photo.image"}}}}, '
                     '"outputs": {"pose": "pose.image", "depth": "depth.image"}}')
    script = ("import sys\nimport nodes\nfrom graphflow.cli import main\n"
              f"assert main(['validate', {str(graph)!r}]) == 0\n"
              "heavy = [name for name in ('torch', 'cv2', 'numpy', 'transformers', 'diffusers', 'controlnet_aux') "
              "if name in sys.modules]\nassert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path,
                   env={"PYTHONPATH": str(Path(__file__).parents[2]), "PATH": "/usr/bin:/bin"})
