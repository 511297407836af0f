"""Relative paths in a document resolve against the document's own folder, from any current directory; documents
written for the old rule (relative to the current directory) keep working with a warning naming the new path;
`--input-dir` adds roots and keeps the default ones; `validate` checks that files exist inside the roots."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from graphflow import Engine, Graph, ValidationError
from graphflow.cli import main
from nodes import LoadImage

WARNING = "was found relative to the current directory"


def _photo(path: Path, color: tuple[int, int, int] = (200, 30, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 8), color).save(path)
    return path


def _document(path: Path, photo: str, **extra: Any) -> Path:
    """A document that loads `photo` (a param default, as the shipped graphs write it) and names the image."""
    document = {"graphflow": 1, "params": {"photo": {"type": "STRING", "default": photo}},
                "nodes": {"photo": {"type": "LoadImage", "inputs": {"path": {"param": "photo"}}}, **extra},
                "outputs": {"image": "photo.image"}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document))
    return path


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An unrelated current directory."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def test_a_document_run_from_another_directory_finds_its_files_beside_it(
        tmp_path: Path, elsewhere: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    _photo(tmp_path / "project" / "graphs" / "assets" / "room.png")
    graph = _document(tmp_path / "project" / "graphs" / "demo.json", "assets/room.png",
                      save={"type": "SaveImage", "inputs": {"image": {"from": "photo.image"}, "prefix": "room"}})
    with caplog.at_level(logging.WARNING):
        assert main(["run", str(graph), "--quiet"]) == 0
    assert Image.open(elsewhere / "output" / "room_00000.png").size == (16, 8)
    assert WARNING not in caplog.text
    assert main(["validate", str(graph)]) == 0 and "valid" in capsys.readouterr().out


def test_a_path_relative_to_the_current_directory_still_works_and_names_the_new_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    _photo(tmp_path / "graphs" / "assets" / "room.png")
    graph = _document(tmp_path / "graphs" / "old.json", "graphs/assets/room.png")
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING):
        result = Engine(output_dir=tmp_path / "out").run(graph)
    assert result.outputs["image"].shape == (1, 8, 16, 3)
    assert f"'graphs/assets/room.png' {WARNING}" in caplog.text
    assert "write 'assets/room.png'" in caplog.text and str(tmp_path / "graphs") in caplog.text


def test_the_documents_folder_wins_over_the_current_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _photo(tmp_path / "graphs" / "room.png", (255, 0, 0))
    _photo(tmp_path / "room.png", (0, 0, 255))
    monkeypatch.chdir(tmp_path)
    image = Engine(output_dir=tmp_path / "out").run(_document(tmp_path / "graphs" / "g.json", "room.png"))
    assert image.outputs["image"][0, 0, 0].tolist() == [1.0, 0.0, 0.0]


def test_input_dir_adds_a_root_and_keeps_the_current_directory(
        tmp_path: Path, elsewhere: Path, capsys: pytest.CaptureFixture[str]) -> None:
    photos = tmp_path / "photos"
    _photo(photos / "a.png")
    _photo(elsewhere / "b.png")
    graph = _document(tmp_path / "graphs" / "g.json", "a.png")
    assert main(["run", str(graph), "--quiet"]) == 1
    assert "[file_not_found] node 'photo', input 'path': no such file" in capsys.readouterr().err
    assert main(["run", str(graph), "--quiet", "--input-dir", str(photos)]) == 0
    assert main(["run", str(graph), "--quiet", "--input-dir", str(photos), "--set", "photo=b.png"]) == 0
    capsys.readouterr()


def test_validate_checks_files_exist_inside_the_roots_with_the_run_options(
        tmp_path: Path, elsewhere: Path, capsys: pytest.CaptureFixture[str]) -> None:
    outside = _photo(tmp_path / "outside" / "room.png")
    graph = _document(tmp_path / "graphs" / "g.json", "missing.png")
    assert main(["validate", str(graph), "--json"]) == 1
    assert [error["code"] for error in json.loads(capsys.readouterr().out)["errors"]] == ["file_not_found"]
    assert main(["validate", str(graph), "--set", f"photo={outside}"]) == 1
    assert "[path_outside_root] node 'photo', input 'path'" in capsys.readouterr().out
    assert main(["validate", str(graph), "--set", f"photo={outside}", "--input-dir", str(outside.parent)]) == 0
    assert "valid" in capsys.readouterr().out


def test_a_templates_node_looks_in_the_templates_folder_then_in_the_using_documents(
        tmp_path: Path, elsewhere: Path) -> None:
    _photo(tmp_path / "graphs" / "templates" / "own.png", (0, 255, 0))
    _photo(tmp_path / "graphs" / "given.png", (0, 0, 255))
    _document(tmp_path / "graphs" / "templates" / "load.json", "own.png")
    using = {"graphflow": 1, "nodes": {
        "own": {"template": "templates/load.json"},
        "given": {"template": "templates/load.json", "inputs": {"photo": "given.png"}}},
        "outputs": {"own": "own.image", "given": "given.image"}}
    graph = tmp_path / "graphs" / "uses.json"
    graph.write_text(json.dumps(using))
    outputs = Engine(output_dir=tmp_path / "out").run(graph).outputs
    assert outputs["own"][0, 0, 0].tolist() == [0.0, 1.0, 0.0]
    assert outputs["given"][0, 0, 0].tolist() == [0.0, 0.0, 1.0]


def test_graphs_built_in_python_resolve_against_the_current_directory(
        elsewhere: Path, caplog: pytest.LogCaptureFixture) -> None:
    _photo(elsewhere / "room.png")
    graph = Graph("built")
    photo = graph.add(LoadImage(path="room.png"), "photo")
    graph.output("image", photo.image)
    with caplog.at_level(logging.WARNING):
        assert Engine(output_dir=elsewhere / "out").run(graph).outputs["image"].shape == (1, 8, 16, 3)
    assert WARNING not in caplog.text


def test_a_dict_document_gets_no_root_from_the_current_directory_when_roots_are_given(
        tmp_path: Path, elsewhere: Path) -> None:
    _photo(elsewhere / "room.png")
    (tmp_path / "roots").mkdir()
    engine = Engine(input_dirs=[tmp_path / "roots"], output_dir=tmp_path / "out")
    document = json.loads(_document(tmp_path / "d.json", "room.png").read_text())
    with pytest.raises(ValidationError, match="no such file"):
        engine.run(document)


def test_sweep_finds_the_templates_files_from_another_directory(tmp_path: Path, elsewhere: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    _photo(tmp_path / "graphs" / "room.png")
    graph = _document(tmp_path / "graphs" / "t.json", "room.png",
                      save={"type": "SaveImage", "inputs": {"image": {"from": "photo.image"}, "prefix": "s"}})
    assert main(["sweep", str(graph), "--grid", "photo=room.png", "--quiet", "--out", "sweep"]) == 0
    assert len(list((elsewhere / "sweep").rglob("s_*.png"))) == 1
    capsys.readouterr()
