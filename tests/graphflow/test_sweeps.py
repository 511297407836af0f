"""Sweeps run a template over a grid of param values: grids read by param type, zips, every problem refused before
anything runs, one folder per job named from its params, sweep.json, a contact sheet, shared nodes run once."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from graphflow import Engine, ValidationError
from graphflow.batches import Batch
from graphflow.contact_sheet import LINE_HEIGHT, MIN_CELL_WIDTH, PADDING
from graphflow.models import ModelManager
from graphflow.sweep_runner import BackendUnavailable, make_backend, run_sweep
from graphflow.sweeps import job_folder, parse_grid, read_job_folder, sweep_batch
from graphflow.templates import parse_params

ROOT = Path(__file__).resolve().parents[2]
ARITHMETIC = {"graphflow": 1, "params": {
    "a": {"type": "INT", "default": 0, "min": 0, "max": 100},
    "b": {"type": "FLOAT", "default": 1.0},
    "word": {"type": "STRING", "default": "x", "choices": ["x", "a red house", "x_y=z~1"]},
    "words": {"type": "STRING", "list": True, "default": []},
}, "nodes": {
    "ia": {"type": "Int", "inputs": {"value": {"param": "a"}}},
    "sum": {"type": "Math", "inputs": {"a": {"from": "ia.value"}, "b": {"param": "b"}, "op": "div"}},
    "join": {"type": "JoinText", "inputs": {"texts": [{"param": "word"}, "!"]}},
}, "outputs": {"sum": "sum.result", "text": "join.text"}}
SPECS = parse_params(ARITHMETIC)[0]


@pytest.fixture
def arithmetic(tmp_path: Path) -> Path:
    path = tmp_path / "arithmetic.json"
    path.write_text(json.dumps(ARITHMETIC))
    return path


def test_grids_are_read_by_param_type_with_inclusive_int_ranges() -> None:
    assert parse_grid(SPECS, "a=0..3") == ("a", [0, 1, 2, 3])
    assert parse_grid(SPECS, "a=0..20..5,30") == ("a", [0, 5, 10, 15, 20, 30])
    assert parse_grid(SPECS, "a=3..1") == ("a", [3, 2, 1])
    assert parse_grid(SPECS, "b=0.5,1") == ("b", [0.5, 1.0])
    assert parse_grid(SPECS, 'word=["a, b","c"]') == ("word", ["a, b", "c"])
    assert parse_grid(SPECS, "word=x,a red house") == ("word", ["x", "a red house"])
    assert parse_grid(SPECS, 'words=[["p","q"],[]]') == ("words", [["p", "q"], []])


@pytest.mark.parametrize("text", ["a=0..5..0", "a=5..0..1", "b=0..2", "a=x", "a", "words=p,q", "nope=1"])
def test_a_grid_that_cannot_be_read_is_refused_with_what_was_expected(text: str) -> None:
    with pytest.raises(ValidationError) as raised:
        parse_grid(SPECS, text)
    assert len(raised.value.errors) == 1


def test_zipped_grids_go_together_and_the_others_multiply() -> None:
    batch = sweep_batch(ARITHMETIC, grid=["a=1,2", "word=x,a red house", "b=3,4,5"], zips=["a,word"],
                        fixed=["words=p"], repeat=2)
    assert batch.groups == ({"a": [1, 2], "word": ["x", "a red house"]}, {"b": [3.0, 4.0, 5.0]})
    assert batch.fixed == {"words": ["p"]} and batch.size() == 12


def test_every_problem_of_a_sweep_is_listed_at_once() -> None:
    with pytest.raises(ValidationError) as raised:
        sweep_batch(ARITHMETIC, grid=["a=0..200", "b=1..2", "word=x,y", "c=1", "a=1"], zips=["b,nope"],
                    fixed=["a=3", "q=1"], repeat=0)
    errors = raised.value.errors
    # b a range, c and q unknown, a twice with --grid and in --set too, nope unzippable, repeat 0, a past its max
    # (told once for its 100 values), word off its choices
    assert [error.input for error in errors] == ["b", "c", "a", "q", "nope", "repeat", "a", "groups[0].a[101]",
                                                 "groups[1].word[1]"]
    assert "99 more values" in errors[7].message


def test_folder_names_read_back_to_the_params_and_long_values_are_shortened() -> None:
    params = {"a": 7, "word": "x_y=z~1", "words": ["p q", "r"]}
    folder = job_folder(3, params, 4)
    assert folder == "0003_a=7_word=x_y%3Dz%7E1_words=%5B%22p+q%22,%22r%22%5D"
    assert read_job_folder(folder, SPECS, list(params)) == (3, params)
    long = job_folder(12, {"word": "a very long prompt " * 5}, 4)
    assert len(long) < 50 and "~" in long
    with pytest.raises(ValueError, match="shortened"):
        read_job_folder(long, SPECS, ["word"])


def test_a_sweep_writes_sweep_json_with_every_job_and_shares_nodes(arithmetic: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    finished = []
    result = run_sweep(arithmetic, sweep_batch(ARITHMETIC, grid=["a=1..2", "word=x,a red house"], fixed=["b=2"]),
                       out, on_job=finished.append)
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["complete"] and summary["total"] == 4 and summary["varied"] == ["a", "word"]
    assert [job["params"] for job in summary["jobs"]] == [
        {"b": 2.0, "a": a, "word": word} for a in (1, 2) for word in ("x", "a red house")]
    for job in summary["jobs"]:
        index, values = read_job_folder(job["folder"], SPECS, summary["varied"])
        assert index == job["index"] and values == {name: job["params"][name] for name in summary["varied"]}
    # the text of each word is joined once, the sum of each a computed once
    assert [sorted(job["ran"]) for job in summary["jobs"]] == [["ia", "join", "sum"], ["join"], ["ia", "sum"], []]
    assert [record.job.index for record in finished] == [0, 1, 2, 3] and result.contact_sheet is None


def test_a_bad_value_or_a_used_out_is_refused_before_anything_runs(arithmetic: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(ValidationError, match=r"groups\[0\]\.a\[1\].*found -1"):
        run_sweep(arithmetic, Batch(groups=({"a": [1, -1]},)), out)
    assert not out.exists()
    run_sweep(arithmetic, Batch(groups=({"a": [1]},)), out)
    with pytest.raises(ValidationError, match="earlier sweep"):
        run_sweep(arithmetic, Batch(groups=({"a": [2]},)), out)


def test_ray_without_its_extra_names_the_extra() -> None:
    if importlib.util.find_spec("ray") is not None:
        pytest.skip("ray is installed here")
    with pytest.raises(BackendUnavailable, match=r"graphflow\[ray\]"):
        make_backend("ray")


def test_image_outputs_are_written_per_job_and_shown_on_a_contact_sheet(tmp_path: Path) -> None:
    (tmp_path / "room.png").write_bytes((ROOT / "graphs/assets/room.png").read_bytes())
    template = tmp_path / "scale.json"
    template.write_text(json.dumps({"graphflow": 1, "params": {"width": {"type": "INT", "default": 16}}, "nodes": {
        "photo": {"type": "LoadImage", "inputs": {"path": "room.png"}},
        "scale": {"type": "ImageScale", "inputs": {"image": {"from": "photo.image"}, "width": {"param": "width"}}}},
        "outputs": {"image": "scale.image"}}))
    out = tmp_path / "out"
    engine = Engine(input_dirs=[tmp_path], output_dir=out)
    result = run_sweep(template, Batch(groups=({"width": [16, 24]},), repeat=2), out, engine=engine)
    files = [record.files for record in result.jobs]
    assert files == [[f"{job_folder(i, {'width': w}, 4)}/image_00000.png"] for i, w in enumerate([16, 24, 16, 24])]
    assert [Image.open(out / job[0]).size[0] for job in files] == [16, 24, 16, 24]
    tallest = max(Image.open(out / job[0]).size[1] for job in files)
    sheet = Image.open(out / "contact_sheet.png")
    columns = rows = math.ceil(math.sqrt(4))
    assert sheet.size == (columns * (MIN_CELL_WIDTH + 2 * PADDING), rows * (tallest + LINE_HEIGHT + 3 * PADDING))


def test_an_interrupted_sweep_keeps_the_finished_jobs_and_lists_them(arithmetic: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"

    def interrupt_after_two(record: object) -> None:
        if len(list(out.iterdir())) and json.loads((out / "sweep.json").read_text())["jobs"][1:]:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(arithmetic, Batch(groups=({"a": [1, 2, 3, 4]},)), out, on_job=interrupt_after_two)
    summary = json.loads((out / "sweep.json").read_text())
    assert not summary["complete"] and [job["params"] for job in summary["jobs"]] == [{"a": 1}, {"a": 2}]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "graphflow.cli", "sweep", *args, "--quiet"], capture_output=True,
                          text=True, cwd=cwd, check=False)


def test_the_command_line_sweeps_and_answers_with_run_exit_codes(arithmetic: Path, tmp_path: Path) -> None:
    done = _cli(str(arithmetic), "--grid", "a=1..3", "--set", "b=2", "--out", "ok", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "3 of 3 jobs" in done.stdout and len(json.loads((tmp_path / "ok/sweep.json").read_text())["jobs"]) == 3
    refused = _cli(str(arithmetic), "--grid", "a=1,500", "--grid", "c=1", "--out", "bad", cwd=tmp_path)
    assert refused.returncode == 1 and "2 problems" in refused.stderr and not (tmp_path / "bad").exists()
    failed = _cli(str(arithmetic), "--grid", "b=1,0,2", "--out", "failed", cwd=tmp_path)
    assert failed.returncode == 3 and "division by zero" in failed.stderr
    stopped = json.loads((tmp_path / "failed/sweep.json").read_text())
    assert not stopped["complete"] and [job["params"]["b"] for job in stopped["jobs"]] == [1.0]
    assert _cli(str(arithmetic), "--grid", "a=1", "--address", "x:1", "--out", "usage", cwd=tmp_path).returncode == 2


_MODELS = ModelManager()
CANNY = ROOT / "graphs/controlnet_canny.json"
TINY = {"checkpoint": "tiny:sd15", "controlnet": "tiny:controlnet-canny", "steps": 2, "width": 64, "height": 48}


def test_an_sd_sweep_runs_shared_nodes_once_and_each_image_is_a_single_run(
        tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAPHFLOW_TINY_MODELS", str(tiny_models))
    out = tmp_path / "out"
    engine = Engine(input_dirs=[ROOT], output_dir=out, models=_MODELS)
    fixed = [f"{name}={value}" for name, value in TINY.items()]
    result = run_sweep(CANNY, sweep_batch(json.loads(CANNY.read_text()), grid=["seed=1..3"], fixed=fixed), out,
                       engine=engine)
    ran = [node for record in result.jobs for node in record.ran]
    for shared in ("photo", "edges", "sd", "cn", "positive", "negative", "control"):
        assert ran.count(shared) == 1, shared
    assert all(ran.count(node) == 3 for node in ("sample", "decode", "save"))
    single = Engine(input_dirs=[ROOT], output_dir=tmp_path / "single", models=_MODELS)
    for record in result.jobs:
        assert record.files == [f"{record.job.folder}/controlnet_canny_00000.png"]
        alone = single.run(CANNY, record.job.params)
        assert np.array_equal(np.asarray(Image.open(out / record.files[0])), np.asarray(Image.open(alone.files[0])))
    # every job's file is in its folder, none left where SaveImage wrote it
    assert sorted(path.name for path in out.iterdir() if path.is_file()) == ["contact_sheet.png", "sweep.json"]
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.size == (2 * (MIN_CELL_WIDTH + 2 * PADDING), 2 * (48 + LINE_HEIGHT + 3 * PADDING))
