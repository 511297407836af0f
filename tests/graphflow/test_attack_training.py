"""Attacks on train_controlnet: paths that leave the allowed directories (through `..`, absolute paths, symlinks),
crafted and corrupted checkpoints (pickles, wrong JSON types, truncated safetensors), a run killed with SIGKILL while
it writes a checkpoint, bad images, empty datasets and two runs into one output folder. Tiny models, 32 px, a few
steps, one torch thread."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from graphflow.paths import PathError
from graphflow.training import TrainConfig, TrainingError, train_controlnet
from graphflow.training.checkpoints import OutputLock, checkpoints
from graphflow.training.circles import write_circles_dataset

SIZE = 32
WEIGHTS = "diffusion_pytorch_model.safetensors"
OUTSIDE = "the file is outside the input directories"


def config(tiny_models: Path, data: Path, out: Path, **changes: object) -> TrainConfig:
    """Two steps of two 32-pixel examples, a checkpoint after each; `changes` override."""
    settings: dict[str, object] = {
        "base_model": str(tiny_models / "sd15"), "data": data, "out": out, "steps": 2, "batch_size": 2,
        "learning_rate": 1e-2, "resolution": SIZE, "conditioning_channels": (8, 8, 16, 16), "checkpoint_every": 1,
        "device": "cpu", "input_dirs": (data.parent if data.is_dir() else data.parent.parent, tiny_models),
        "progress": False,
    }
    return TrainConfig(**(settings | changes))  # type: ignore[arg-type]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """A circles dataset of two examples in tmp_path/allowed/data; tmp_path/secret lies outside the inputs."""
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "passwd.png").write_bytes(b"not for training")
    (tmp_path / "secret" / "prompt.txt").write_text("a secret prompt")
    return write_circles_dataset(tmp_path / "allowed" / "data", count=2, size=SIZE)


def jsonl(data: Path, image: str, control: str = "conditioning/0.png") -> Path:
    file = data / "train.jsonl"
    file.write_text(json.dumps({"image": image, "conditioning_image": control, "text": "x"}) + "\n")
    return file


# --- paths ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("image", ["../../secret/passwd.png", "../../secret/absent.png", "/etc/passwd",
                                   "../../../../../../../../etc/passwd"])
def test_a_jsonl_path_outside_the_inputs_is_refused_naming_its_line_whether_or_not_it_exists(
        tiny_models: Path, data: Path, tmp_path: Path, image: str) -> None:
    with pytest.raises(TrainingError, match=rf"line 1 names '{image}'.*{OUTSIDE}") as caught:
        train_controlnet(config(tiny_models, jsonl(data, image), tmp_path / "out"))
    assert "no such file" not in str(caught.value)  # no probing which files exist outside
    assert not (tmp_path / "out" / "controlnet").exists()


def test_an_absolute_jsonl_path_inside_the_inputs_is_used(tiny_models: Path, data: Path, tmp_path: Path) -> None:
    result = train_controlnet(config(tiny_models, jsonl(data, str(data / "images" / "1.png")), tmp_path / "out",
                                     steps=1, batch_size=1))
    assert len(result.losses) == 1


def test_a_jsonl_control_image_symlinked_outside_is_refused(tiny_models: Path, data: Path, tmp_path: Path) -> None:
    (data / "conditioning" / "link.png").symlink_to(tmp_path / "secret" / "passwd.png")
    with pytest.raises(TrainingError, match=rf"names 'conditioning/link.png'.*{OUTSIDE}"):
        train_controlnet(config(tiny_models, jsonl(data, "images/0.png", "conditioning/link.png"), tmp_path / "out"))


@pytest.mark.parametrize("member", ["images/0.png", "conditioning/0.png", "images/0.txt"])
def test_a_folder_dataset_member_symlinked_outside_is_refused(tiny_models: Path, data: Path, tmp_path: Path,
                                                              member: str) -> None:
    target = tmp_path / "secret" / ("prompt.txt" if member.endswith(".txt") else "passwd.png")
    (data / member).unlink()
    (data / member).symlink_to(target)
    with pytest.raises(PathError, match=OUTSIDE):
        train_controlnet(config(tiny_models, data, tmp_path / "out"))


def test_a_symlink_inside_the_inputs_is_followed(tiny_models: Path, data: Path, tmp_path: Path) -> None:
    (data / "images" / "1.png").unlink()
    (data / "images" / "1.png").symlink_to(data / "images" / "0.png")
    assert len(train_controlnet(config(tiny_models, data, tmp_path / "out", steps=1)).losses) == 1


def test_an_output_folder_inside_a_symlink_is_written_through_it(tiny_models: Path, data: Path,
                                                               tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    result = train_controlnet(config(tiny_models, data, tmp_path / "link" / "out", steps=1))
    assert result.controlnet == tmp_path / "real" / "out" / "controlnet"
    assert (tmp_path / "real" / "out" / "controlnet" / WEIGHTS).is_file()


# --- crafted and corrupted checkpoints --------------------------------------------------------------------------------

@pytest.fixture
def finished(tiny_models: Path, data: Path, tmp_path: Path) -> TrainConfig:
    """A two-step run's settings, its checkpoint-1 and checkpoint-2 written; resume it with steps=3."""
    settings = config(tiny_models, data, tmp_path / "out")
    train_controlnet(settings)
    return replace(settings, steps=3, resume=True)


class _Opens:
    """Unpickling this creates the file `marker`: proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (str(self.marker), "w")


def test_a_checkpoint_whose_weights_are_a_pickle_is_refused_unopened(finished: TrainConfig, tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    folder = finished.out / "checkpoint-2" / "controlnet"
    (folder / WEIGHTS).unlink()
    (folder / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(_Opens(marker)))
    with pytest.raises(TrainingError, match="checkpoint-2"):
        train_controlnet(finished)
    assert not marker.exists()


def test_a_pickled_optimizer_state_is_refused_unopened(finished: TrainConfig, tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    (finished.out / "checkpoint-2" / "optimizer.safetensors").write_bytes(pickle.dumps(_Opens(marker)))
    with pytest.raises(TrainingError, match="cannot read the optimizer state"):
        train_controlnet(finished)
    assert not marker.exists()


def test_a_missing_optimizer_state_is_refused(finished: TrainConfig) -> None:
    (finished.out / "checkpoint-2" / "optimizer.safetensors").rename(finished.out / "checkpoint-2" / "optimizer.pt")
    with pytest.raises(TrainingError, match="cannot read the optimizer state"):
        train_controlnet(finished)


def test_truncated_controlnet_weights_in_a_checkpoint_are_refused(finished: TrainConfig) -> None:
    weights = finished.out / "checkpoint-2" / "controlnet" / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(TrainingError, match="checkpoint-2"):
        train_controlnet(finished)


def test_optimizer_tensors_of_the_wrong_shape_are_refused(finished: TrainConfig) -> None:
    path = finished.out / "checkpoint-2" / "optimizer.safetensors"
    tensors = load_file(path)
    name = next(name for name in tensors if name.endswith(".exp_avg"))
    tensors[name] = torch.zeros(3)
    save_file(tensors, path)
    with pytest.raises(TrainingError, match=rf"optimizer state .*{name.split('.')[0]}"):
        train_controlnet(finished)


@pytest.mark.parametrize(("field", "value"), [
    ("step", "2"), ("step", -1), ("step", 1.5), ("step", True), ("step", 10**400), ("losses", "0.1"),
    ("losses", [0.1]), ("losses", ["a", "b"]), ("fixed", []), ("optimizer", []), ("optimizer", {"state": 3}),
    ("optimizer", {"state": {"x": {}}, "param_groups": []}), ("scaler", "big"), ("config", 7),
])
def test_a_training_state_with_wrong_types_is_refused_by_field(finished: TrainConfig, field: str,
                                                               value: object) -> None:
    path = finished.out / "checkpoint-2" / "training_state.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {field: value}))
    with pytest.raises(TrainingError, match=field):
        train_controlnet(finished)


def test_an_infinite_step_is_refused(finished: TrainConfig) -> None:
    path = finished.out / "checkpoint-2" / "training_state.json"
    path.write_text(path.read_text().replace('"step": 2', '"step": 1e999'))
    with pytest.raises(TrainingError, match="step"):
        train_controlnet(finished)


def test_optimizer_settings_in_the_state_are_not_taken_from_the_checkpoint(finished: TrainConfig) -> None:
    path = finished.out / "checkpoint-2" / "training_state.json"
    record = json.loads(path.read_text())
    record["optimizer"]["param_groups"][0] |= {"amsgrad": True, "maximize": True, "foreach": "yes"}
    path.write_text(json.dumps(record))
    result = train_controlnet(finished)  # amsgrad would need tensors the checkpoint lacks; maximize would diverge
    assert len(result.losses) == 3 and all(loss == loss for loss in result.losses)


@pytest.mark.parametrize("part", ["checkpoint", "controlnet", "optimizer.safetensors"])
def test_a_checkpoint_whose_files_are_symlinked_outside_is_refused(finished: TrainConfig, tmp_path: Path,
                                                                  part: str) -> None:
    outside = tmp_path / "secret" / "stolen"
    checkpoint = finished.out / "checkpoint-2"
    if part == "checkpoint":
        checkpoint.rename(outside)
        checkpoint.symlink_to(outside)
    else:
        (checkpoint / part).rename(outside)
        (checkpoint / part).symlink_to(outside)
    with pytest.raises(TrainingError, match="outside the output directory"):
        train_controlnet(finished)


# --- a run killed while it writes -------------------------------------------------------------------------------------

DIE_WRITING = """
import os, signal, sys
from graphflow.training import checkpoints
def dying(folder, _sync_tree=checkpoints._sync_tree):
    if folder.name.startswith(".checkpoint-3."):
        os.kill(os.getpid(), signal.SIGKILL)
    _sync_tree(folder)
checkpoints._sync_tree = dying
from graphflow.cli import main
sys.exit(main(sys.argv[1:]))
"""

DIE_DELETING = """
import os, shutil, signal, sys
from pathlib import Path
rmtree = shutil.rmtree
def dying(path, *args, **kwargs):
    doomed = [folder for folder in Path(path).rglob("controlnet") if "checkpoint-1" in str(folder)]
    if doomed:
        rmtree(doomed[0])  # half of the old checkpoint gone, then killed
        os.kill(os.getpid(), signal.SIGKILL)
    rmtree(path, *args, **kwargs)
shutil.rmtree = dying
from graphflow.cli import main
sys.exit(main(sys.argv[1:]))
"""


def command(settings: TrainConfig, *extra: str) -> list[str]:
    return ["train-controlnet", "--base-model", settings.base_model, "--data", str(settings.data),
            "--out", str(settings.out), "--steps", str(settings.steps), "--batch-size", str(settings.batch_size),
            "--resolution", str(SIZE), "--device", "cpu", "--checkpoint-every", "1", "--learning-rate", "0.01",
            "--conditioning-channels", "8,8,16,16", "--quiet",
            *(arg for folder in settings.input_dirs for arg in ("--input-dir", str(folder))), *extra]


def run_cli(script: str | None, settings: TrainConfig, *extra: str) -> subprocess.Popen[str]:
    program = ["-c", script] if script else ["-m", "graphflow.cli"]
    return subprocess.Popen([sys.executable, *program, *command(settings, *extra)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})


def test_a_run_killed_while_writing_a_checkpoint_resumes_from_the_last_whole_one(
        tiny_models: Path, data: Path, tmp_path: Path) -> None:
    settings = config(tiny_models, data, tmp_path / "killed", steps=4)
    killed = run_cli(DIE_WRITING, settings)
    killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL
    assert sorted(checkpoints(settings.out)) == [1, 2]
    assert [entry.name for entry in settings.out.iterdir() if entry.name.startswith(".checkpoint-3.")]
    resumed = train_controlnet(replace(settings, resume=True))
    whole = train_controlnet(replace(settings, out=tmp_path / "whole"))
    assert resumed.resumed_from == settings.out.resolve() / "checkpoint-2"
    assert resumed.losses == whole.losses
    ours, theirs = load_file(resumed.controlnet / WEIGHTS), load_file(whole.controlnet / WEIGHTS)
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)
    assert not [entry.name for entry in settings.out.iterdir() if entry.name.endswith(".tmp")]


def test_a_run_killed_while_deleting_an_old_checkpoint_leaves_no_half_checkpoint(
        tiny_models: Path, data: Path, tmp_path: Path) -> None:
    settings = config(tiny_models, data, tmp_path / "killed", steps=3)
    killed = run_cli(DIE_DELETING, settings, "--keep-checkpoints", "1")
    killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL
    found = checkpoints(settings.out)
    assert found and all((folder / "controlnet" / WEIGHTS).is_file() for folder in found.values())
    resumed = train_controlnet(replace(settings, resume=True, keep_checkpoints=1))
    assert len(resumed.losses) == 3 and sorted(checkpoints(settings.out)) == [3]


def test_a_run_killed_at_a_random_moment_resumes_to_the_same_losses(tiny_models: Path, data: Path,
                                                                    tmp_path: Path) -> None:
    settings = config(tiny_models, data, tmp_path / "killed", steps=12)
    process = run_cli(None, settings)
    deadline = time.monotonic() + 300
    while len(checkpoints(settings.out)) < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    for step, folder in checkpoints(settings.out).items():  # every checkpoint it lists is whole
        assert json.loads((folder / "training_state.json").read_text())["step"] == step
        assert load_file(folder / "controlnet" / WEIGHTS) and load_file(folder / "optimizer.safetensors") is not None
    resumed = train_controlnet(replace(settings, resume=True))
    whole = train_controlnet(replace(settings, out=tmp_path / "whole"))
    assert resumed.losses == whole.losses


# --- bad data, empty data, two runs at once ---------------------------------------------------------------------------

@pytest.mark.parametrize("content", [b"", b"not an image", b"\x89PNG\r\n\x1a\n" + b"\0" * 40])
def test_an_unreadable_image_is_refused_by_name(tiny_models: Path, data: Path, tmp_path: Path,
                                                content: bytes) -> None:
    (data / "images" / "1.png").write_bytes(content)
    with pytest.raises(TrainingError, match=r"cannot read the image .*1\.png"):
        train_controlnet(config(tiny_models, data, tmp_path / "out"))


def test_a_truncated_image_is_refused_by_name(tiny_models: Path, data: Path, tmp_path: Path) -> None:
    png = (data / "images" / "1.png").read_bytes()
    (data / "images" / "1.png").write_bytes(png[: len(png) // 2])
    with pytest.raises(TrainingError, match=r"cannot read the image .*1\.png"):
        train_controlnet(config(tiny_models, data, tmp_path / "out"))


def test_a_control_image_of_another_shape_is_refused_and_one_of_another_size_is_scaled(
        tiny_models: Path, data: Path, tmp_path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (SIZE * 2, SIZE * 2)).save(data / "conditioning" / "0.png")  # same aspect: fine
    assert len(train_controlnet(config(tiny_models, data, tmp_path / "ok", steps=1)).losses) == 1
    Image.new("RGB", (SIZE, SIZE * 2)).save(data / "conditioning" / "1.png")
    with pytest.raises(TrainingError, match="same aspect ratio"):
        train_controlnet(config(tiny_models, data, tmp_path / "askew", steps=1))


@pytest.mark.parametrize("kind", ["folder", "jsonl", "blank jsonl", "only text files"])
def test_a_dataset_of_no_examples_is_refused(tiny_models: Path, tmp_path: Path, kind: str) -> None:
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "conditioning").mkdir()
    if kind == "only text files":
        (data / "images" / "0.txt").write_text("a prompt without an image")
    source = data
    if "jsonl" in kind:
        source = data / "train.jsonl"
        source.write_text("" if kind == "jsonl" else "\n  \n\n")
    with pytest.raises(TrainingError, match="holds no examples"):
        train_controlnet(config(tiny_models, source, tmp_path / "out", input_dirs=(tmp_path, tiny_models)))
    assert not (tmp_path / "out" / "controlnet").exists()


def test_a_second_run_into_the_same_output_folder_is_refused_while_the_first_writes(
        tiny_models: Path, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    lock = OutputLock(out.resolve())
    try:
        with pytest.raises(TrainingError, match="another training run is writing into"):
            train_controlnet(config(tiny_models, data, out))
        assert sorted(entry.name for entry in out.iterdir()) == [".train-controlnet.lock"]
    finally:
        lock.release()
    assert len(train_controlnet(config(tiny_models, data, out, steps=1)).losses) == 1  # free again


def test_a_second_process_into_the_same_output_folder_exits_with_an_error(tiny_models: Path, data: Path,
                                                                          tmp_path: Path) -> None:
    settings = config(tiny_models, data, tmp_path / "out", steps=5000)  # killed long before its end
    first = run_cli(None, settings)
    deadline = time.monotonic() + 300
    while not checkpoints(settings.out) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    second = run_cli(None, settings)
    _, error = second.communicate(timeout=300)
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=60)
    assert second.returncode == 1 and "another training run is writing into" in error



@pytest.mark.parametrize(("name", "pixels"), [("16-bit grey", np.full((SIZE, SIZE), 40000, np.uint16)),
                                              ("float", np.full((SIZE, SIZE), 0.5, np.float32))])
def test_a_16_bit_or_float_image_is_refused_rather_than_clipped(tiny_models: Path, data: Path, tmp_path: Path,
                                                                name: str, pixels: np.ndarray) -> None:
    from PIL import Image

    (data / "images" / "1.png").unlink()
    Image.fromarray(pixels).save(data / "images" / "1.tiff")
    (data / "conditioning" / "1.png").rename(data / "conditioning" / "1.tiff")
    with pytest.raises(TrainingError, match=r"1\.tiff has .* pixels \(16-bit or float\); .* save it as 8-bit"):
        train_controlnet(config(tiny_models, data, tmp_path / "out"))


def test_8_bit_modes_are_read_as_rgb(tmp_path: Path) -> None:
    from PIL import Image

    from graphflow.training.dataset import TrainingSamples, Triple

    pictures = {"grey.png": Image.new("L", (8, 8), 200), "palette.png": Image.new("P", (8, 8)),
                "cmyk.jpg": Image.new("CMYK", (8, 8)), "alpha.png": Image.new("LA", (8, 8), (200, 10))}
    for name, picture in pictures.items():
        picture.save(tmp_path / name)
    samples = TrainingSamples([Triple(tmp_path / name, tmp_path / name, "") for name in pictures], 8)
    batch = samples.batch(list(range(len(pictures))))
    assert batch.controls.shape == (4, 3, 8, 8) and abs(float(batch.controls[0].max()) - 200 / 255) < 1e-6


def test_a_lock_file_that_is_a_symlink_is_refused_and_creates_nothing_where_it_points(
        tiny_models: Path, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / ".train-controlnet.lock").symlink_to(tmp_path / "secret" / "created")
    with pytest.raises(TrainingError, match=r"cannot lock the output folder .* symlink"):
        train_controlnet(config(tiny_models, data, out))
    assert not (tmp_path / "secret" / "created").exists()


@pytest.mark.parametrize("folder", ["images", "conditioning"])
def test_a_dataset_subfolder_symlinked_outside_is_refused(tiny_models: Path, data: Path, tmp_path: Path,
                                                          folder: str) -> None:
    (data / folder).rename(tmp_path / "secret" / folder)
    (data / folder).symlink_to(tmp_path / "secret" / folder)
    with pytest.raises(PathError, match=OUTSIDE):
        train_controlnet(config(tiny_models, data, tmp_path / "out"))
