"""train_controlnet and `graphflow train-controlnet` on the tiny models, with a generated circles-and-fills dataset:
the loss falls, checkpoints are whole and resume exactly, the trained ControlNet loads through ControlNetLoader in an
ordinary graph and changes its render, and bad data is refused with messages that say what is wrong."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from graphflow import Engine
from graphflow.cli import main
from graphflow.models import ModelManager
from graphflow.paths import PathError
from graphflow.training import StepReport, TrainConfig, TrainingError, train_controlnet
from graphflow.training.circles import write_circles_dataset
from graphflow.training.validation import VALIDATION_DOCUMENT

ROOT = Path(__file__).resolve().parents[2]
CANNY_TEMPLATE = ROOT / "graphs" / "templates" / "canny_control.json"
SIZE = 64
EXAMPLES = 8


def config(tiny_models: Path, data: Path, out: Path, **changes: object) -> TrainConfig:
    """Small settings that learn fast on the tiny models; `changes` override them."""
    settings: dict[str, object] = {
        "base_model": str(tiny_models / "sd15"), "data": data, "out": out, "steps": 20, "batch_size": 4,
        "learning_rate": 1e-2, "resolution": SIZE, "conditioning_channels": (8, 8, 16, 16), "checkpoint_every": 10,
        "validation_steps": 2, "device": "cpu", "input_dirs": (data.parent, tiny_models, ROOT), "progress": False,
    }
    return TrainConfig(**(settings | changes))  # type: ignore[arg-type]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread while these tests train: on two shared cores, two OpenMP threads spinning against other
    processes made a tiny training step ~40x slower (1.8 s instead of 0.04 s, measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def circles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_circles_dataset(tmp_path_factory.mktemp("circles") / "data", count=EXAMPLES, size=SIZE)


@pytest.fixture(scope="module")
def trained(tiny_models: Path, circles: Path) -> tuple[TrainConfig, object, list[StepReport]]:
    """20 steps of 4 examples, checkpoints and validation images every 10."""
    settings = config(tiny_models, circles, circles.parent / "out", validate_every=10)
    reports: list[StepReport] = []
    return settings, train_controlnet(settings, on_step=reports.append), reports


def test_the_loss_falls_over_twenty_steps(trained: tuple) -> None:
    _, result, reports = trained
    losses = result.losses
    quarter = len(losses) // 4
    print(f"\nlosses: {' '.join(f'{loss:.3f}' for loss in losses)}; {result.samples_per_second:.2f} samples/s")
    assert len(losses) == 20 and [report.step for report in reports] == list(range(1, 21))
    assert np.mean(losses[-quarter:]) < np.mean(losses[:quarter]) - 0.1
    assert result.samples_per_second > 0 and reports[-1].loss == losses[-1]


def test_checkpoints_hold_safetensors_and_a_state_to_resume_from(trained: tuple) -> None:
    settings, result, _ = trained
    out = settings.out
    assert [path.name for path in result.checkpoints] == ["checkpoint-10", "checkpoint-20"]
    state = json.loads((out / "checkpoint-10" / "training_state.json").read_text())
    assert state["step"] == 10 and state["losses"] == result.losses[:10] and state["fixed"]["seed"] == 0
    assert load_file(out / "checkpoint-10" / "optimizer.safetensors")  # AdamW moments, never a pickle
    assert (out / "controlnet" / "diffusion_pytorch_model.safetensors").is_file()
    written = [path.name for path in out.rglob("*")]
    assert not [name for name in written if name.endswith((".tmp", ".bin", ".pt", ".pth", ".pkl"))]
    assert [path.relative_to(out).as_posix() for path in result.validation_images] == [
        "validation/step-10/image-0_00000.png", "validation/step-20/image-0_00000.png"]


def test_validation_images_change_as_the_controlnet_learns(trained: tuple) -> None:
    _, result, _ = trained
    first, last = (np.asarray(Image.open(path)) for path in result.validation_images)
    assert first.shape == (SIZE, SIZE, 3) and not np.array_equal(first, last)


def test_the_trained_controlnet_changes_a_render_through_controlnet_loader(trained: tuple, tiny_models: Path,
                                                                            tmp_path: Path) -> None:
    from diffusers import ControlNetModel, UNet2DConditionModel

    settings, result, _ = trained
    untrained = tmp_path / "untrained"
    unet = UNet2DConditionModel.from_pretrained(tiny_models / "sd15", subfolder="unet")
    ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16)).save_pretrained(untrained)
    engine = Engine(input_dirs=[settings.data.parent, tiny_models, tmp_path], output_dir=tmp_path / "renders",
                    models=ModelManager())

    def render(controlnet: Path) -> torch.Tensor:
        params = {"checkpoint": str(tiny_models / "sd15"), "controlnet": str(controlnet), "steps": 3,
                  "control": str(settings.data / "conditioning" / "0.png"), "width": SIZE, "height": SIZE}
        return engine.run(VALIDATION_DOCUMENT, params, outputs=["image"]).outputs["image"]

    shutil.copytree(result.controlnet, tmp_path / "trained")
    before, after = render(untrained), render(tmp_path / "trained")
    assert before.shape == after.shape == (1, SIZE, SIZE, 3)
    assert (after - before).abs().mean() > 1e-3


def test_a_resumed_run_computes_the_same_losses_and_weights(tiny_models: Path, tmp_path: Path) -> None:
    data = write_circles_dataset(tmp_path / "data", count=4, size=32)
    settings = config(tiny_models, data, tmp_path / "whole", steps=4, batch_size=2, resolution=32,
                      gradient_accumulation_steps=2, checkpoint_every=2)
    whole = train_controlnet(settings)

    def stop_after_three(report: StepReport) -> None:
        if report.step == 3:
            raise KeyboardInterrupt

    interrupted = replace(settings, out=tmp_path / "interrupted")
    with pytest.raises(KeyboardInterrupt):
        train_controlnet(interrupted, on_step=stop_after_three)
    assert sorted(path.name for path in interrupted.out.glob("checkpoint-*")) == ["checkpoint-2"]
    resumed = train_controlnet(replace(interrupted, resume=True))
    assert resumed.resumed_from == interrupted.out.resolve() / "checkpoint-2"
    assert resumed.losses == whole.losses
    weights = "diffusion_pytorch_model.safetensors"
    ours, theirs = load_file(resumed.controlnet / weights), load_file(whole.controlnet / weights)
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)


def test_a_v_prediction_base_is_trained_on_the_velocity(tiny_models: Path, tmp_path: Path) -> None:
    data = write_circles_dataset(tmp_path / "data", count=2, size=32)
    v_base = shutil.copytree(tiny_models / "sd15", tmp_path / "sd15-v")
    scheduler = v_base / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps(json.loads(scheduler.read_text()) | {"prediction_type": "v_prediction"}))
    settings = config(tiny_models, data, tmp_path / "epsilon", steps=1, batch_size=2, resolution=32)
    epsilon = train_controlnet(settings)
    velocity = train_controlnet(replace(settings, base_model=str(v_base), out=tmp_path / "velocity"))
    assert np.isfinite(velocity.losses[0]) and velocity.losses[0] != epsilon.losses[0]


def test_the_command_trains_from_jsonl_with_template_made_controls_keeping_the_last_checkpoint(
        tiny_models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_circles_dataset(tmp_path / "data", count=2, size=32)
    shutil.rmtree(data / "conditioning")
    lines = [json.dumps({"image": f"images/{index}.png", "text": f"circle {index}"}) for index in range(2)]
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    (out / ".checkpoint-7.k1ll3d00.tmp").mkdir(parents=True)  # what a run killed while writing a checkpoint leaves
    status = main(["train-controlnet", "--base-model", str(tiny_models / "sd15"), "--data", str(data / "train.jsonl"),
                   "--out", str(out), "--steps", "2", "--batch-size", "2", "--resolution", "32", "--device", "cpu",
                   "--checkpoint-every", "1", "--keep-checkpoints", "1",
                   "--conditioning-channels", "8,8,16,16", "--control-template", str(CANNY_TEMPLATE),
                   "--control-set", "low=50", "--validate-every", "2", "--validation-steps", "1", "--quiet",
                   "--input-dir", str(tmp_path), "--input-dir", str(tiny_models), "--input-dir", str(ROOT)])
    printed = capsys.readouterr()
    assert status == 0, printed.err
    assert "trained 2 steps" in printed.out and "samples/s" in printed.out
    control = np.asarray(Image.open(out / "validation" / "control-0.png"))
    assert set(np.unique(control)) >= {0, 255}  # Canny edges of the first circle, made by the template
    assert (out / "controlnet" / "config.json").is_file()
    assert sorted(path.name for path in out.iterdir()) == [".train-controlnet.lock", "checkpoint-2", "controlnet",
                                                           "validation"]


def test_bf16_mixed_precision_trains_in_a_process_of_its_own(tiny_models: Path, tmp_path: Path) -> None:
    # a process of its own: accelerate keeps one mixed-precision setting per process
    data = write_circles_dataset(tmp_path / "data", count=2, size=32)
    command = [sys.executable, "-m", "graphflow.cli", "train-controlnet", "--base-model", str(tiny_models / "sd15"),
               "--data", str(data), "--out", str(tmp_path / "out"), "--steps", "2", "--batch-size", "2",
               "--resolution", "32", "--device", "cpu", "--mixed-precision", "bf16", "--conditioning-channels",
               "8,8,16,16", "--quiet", "--input-dir", str(tmp_path), "--input-dir", str(tiny_models)]
    completed = subprocess.run(command, capture_output=True, text=True, check=False,
                               env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 0, completed.stderr
    assert "trained 2 steps" in completed.stdout
    weights = load_file(tmp_path / "out" / "controlnet" / "diffusion_pytorch_model.safetensors")
    assert {tensor.dtype for tensor in weights.values()} == {torch.float32}  # trained in float32 under autocast


def test_template_made_controls_come_from_the_cache_the_second_time(tmp_path: Path) -> None:
    from graphflow.training.dataset import ControlTemplate

    data = write_circles_dataset(tmp_path / "data", count=1)
    target = data / "images" / "0.png"

    def engine() -> Engine:
        return Engine(input_dirs=[tmp_path, ROOT], output_dir=tmp_path / "out", disk_cache=tmp_path / "cache",
                      models=ModelManager())

    template = ControlTemplate(CANNY_TEMPLATE, {"low": 50}, engine())
    first = np.asarray(template(target))
    assert first.max() == 255 and first.shape == (SIZE, SIZE, 3)
    in_memory = template.engine.run(template.document(target), outputs=["control"])
    next_process = engine().run(template.document(target), outputs=["control"])  # a fresh engine: from disk
    assert in_memory.ran == next_process.ran == []
    assert np.array_equal(np.asarray(ControlTemplate(CANNY_TEMPLATE, {"low": 50}, engine())(target)), first)


def test_examples_are_cropped_square_and_scaled_as_diffusers_trains_them(tmp_path: Path) -> None:
    from graphflow.training.dataset import TrainingSamples, Triple

    Image.fromarray(np.full((60, 100, 3), 255, np.uint8)).save(tmp_path / "wide.png")
    Image.fromarray(np.zeros((30, 50, 3), np.uint8)).save(tmp_path / "wide-control.png")
    Image.fromarray(np.zeros((50, 50, 3), np.uint8)).save(tmp_path / "square-control.png")
    samples = TrainingSamples([Triple(tmp_path / "wide.png", tmp_path / "wide-control.png", "wide"),
                               Triple(tmp_path / "wide.png", tmp_path / "square-control.png", "askew")], 32)
    batch = samples.batch([0])
    assert batch.targets.shape == batch.controls.shape == (1, 3, 32, 32) and batch.prompts == ["wide"]
    assert batch.targets.min() == batch.targets.max() == 1.0 and batch.controls.max() == 0.0  # [-1, 1] and [0, 1]
    with pytest.raises(TrainingError, match="is 50x50, the target 100x60: they must have the same aspect ratio"):
        samples.batch([1])


def test_a_missing_dataset_is_refused_by_path(tiny_models: Path, tmp_path: Path) -> None:
    with pytest.raises(PathError, match="no such file or folder"):
        train_controlnet(config(tiny_models, tmp_path / "absent", tmp_path / "out"))


def test_mismatched_examples_are_listed(tiny_models: Path, tmp_path: Path) -> None:
    data = write_circles_dataset(tmp_path / "data", count=3)
    (data / "conditioning" / "1.png").unlink()
    (data / "images" / "2.txt").unlink()
    with pytest.raises(TrainingError, match=r"1 targets without a control image .*\(1\).*without a prompt .*\(2\)"):
        train_controlnet(config(tiny_models, data, tmp_path / "out"))


def test_jsonl_problems_name_their_line(tiny_models: Path, tmp_path: Path) -> None:
    data = write_circles_dataset(tmp_path / "data", count=1)
    rows = [{"image": "images/0.png", "conditioning_image": "conditioning/0.png", "text": "ok"},
            {"image": "images/0.png", "text": "no control"}]
    (data / "train.jsonl").write_text("\n".join(map(json.dumps, rows)))
    with pytest.raises(TrainingError, match="line 2 lacks conditioning_image"):
        train_controlnet(config(tiny_models, data / "train.jsonl", tmp_path / "out"))


def test_a_template_without_an_image_param_is_refused(tiny_models: Path, tmp_path: Path) -> None:
    data = write_circles_dataset(tmp_path / "data", count=1)
    with pytest.raises(TrainingError, match="exactly one IMAGE param"):
        train_controlnet(config(tiny_models, data, tmp_path / "out",
                                control_template=ROOT / "graphs" / "controlnet_canny.json"))


def test_an_unknown_control_template_param_is_refused_before_anything_loads(tiny_models: Path, tmp_path: Path) -> None:
    data = write_circles_dataset(tmp_path / "data", count=1)
    with pytest.raises(TrainingError, match=r"control template .* cannot run on .*unknown"):
        train_controlnet(config(tiny_models, data, tmp_path / "out", control_template=CANNY_TEMPLATE,
                                control_params={"lowest": 5}))


def test_settings_that_cannot_work_are_all_listed(tiny_models: Path, tmp_path: Path) -> None:
    settings = config(tiny_models, tmp_path, tmp_path / "out", resolution=60, batch_size=0, mixed_precision="fp8")
    with pytest.raises(TrainingError) as caught:
        train_controlnet(settings)
    message = str(caught.value)
    assert "batch_size must be at least 1" in message and "multiple of 8" in message and "fp8" in message


def test_a_fresh_run_never_mixes_with_old_checkpoints(tiny_models: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    data = write_circles_dataset(tmp_path / "data", count=1)
    (tmp_path / "out" / "checkpoint-5").mkdir(parents=True)
    (tmp_path / "out" / "checkpoint-5" / "training_state.json").write_text("{}")
    status = main(["train-controlnet", "--base-model", str(tiny_models / "sd15"), "--data", str(data),
                   "--out", str(tmp_path / "out"), "--input-dir", str(tmp_path), "--input-dir", str(tiny_models)])
    assert status == 1
    assert "already holds checkpoints (checkpoint-5); resume" in capsys.readouterr().err


def test_a_validation_graph_without_a_controlnet_param_is_refused(tiny_models: Path, tmp_path: Path) -> None:
    data = write_circles_dataset(tmp_path / "data", count=1)
    with pytest.raises(TrainingError, match="must declare a 'controlnet' param"):
        train_controlnet(config(tiny_models, data, tmp_path / "out", validate_every=1,
                                validation_graph=CANNY_TEMPLATE))


def test_an_sdxl_base_model_is_refused_before_anything_loads(tiny_models: Path, tmp_path: Path) -> None:
    data = write_circles_dataset(tmp_path / "data", count=1)
    with pytest.raises(TrainingError, match=r"not an SD1\.5-family text-to-image model"):
        train_controlnet(config(tiny_models, data, tmp_path / "out", base_model=str(tiny_models / "sdxl")))


def test_resuming_from_a_checkpoint_outside_the_allowed_directories_is_refused(tiny_models: Path,
                                                                                tmp_path: Path) -> None:
    data = write_circles_dataset(tmp_path / "data", count=1)
    with pytest.raises(TrainingError, match="outside the output directory"):
        train_controlnet(config(tiny_models, data, tmp_path / "out", resume=Path("/proc")))
