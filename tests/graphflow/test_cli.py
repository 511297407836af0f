"""The `graphflow` command line: run, validate, nodes, schema."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from PIL import Image

from graphflow.cli import main

GRAPHS = Path(__file__).resolve().parents[2] / "graphs"


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of graphs/ as the current directory, as a user running the README commands has."""
    shutil.copytree(GRAPHS, tmp_path / "graphs")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_run_writes_pngs_and_prints_a_summary(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "graphs/canny_blend.json", "--out", "renders", "--set", "low=30", "--quiet"]) == 0
    out = capsys.readouterr().out
    written = workspace / "renders" / "canny_blend_00000.png"
    assert "ran 5 nodes, 0 from cache" in out and f"wrote {written}" in out
    assert Image.open(written).size == (128, 96)
    assert json.loads(Image.open(written).text["params"])["low"] == 30


def test_run_reports_every_bad_assignment(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "graphs/canny_blend.json", "--set", "lo=3", "--set", "high=x"]) == 1
    err = capsys.readouterr().err
    assert "[unknown_param] 'lo'" in err and "did you mean 'low'?" in err and "[invalid_value] 'high'" in err


def test_run_refuses_input_files_outside_the_input_dir_unless_widened(
        workspace: Path, tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]) -> None:
    elsewhere = tmp_path_factory.mktemp("photos")
    shutil.copy(GRAPHS / "assets" / "room.png", elsewhere / "room.png")
    args = ["run", "graphs/canny_blend.json", "--set", f"photo={elsewhere / 'room.png'}", "--quiet"]
    assert main(args) == 1
    assert "[path_outside_root] node 'photo', input 'path'" in capsys.readouterr().err
    assert main([*args, "--input-dir", str(workspace), "--input-dir", str(elsewhere)]) == 0


def test_run_reports_a_failing_node_by_id_and_type(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    document = {"graphflow": 1, "nodes": {"zero": {"type": "Math", "inputs": {"a": 1.0, "b": 0.0, "op": "div"}}},
                "outputs": {"x": "zero.result"}}
    (workspace / "div.json").write_text(json.dumps(document))
    assert main(["run", "div.json"]) == 3  # DESIGN's exit code for a failed node
    assert "node 'zero' (Math) failed: NodeInputError: division by zero" in capsys.readouterr().err


def test_validate_lists_every_problem_and_exits_1(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    document = {"graphflow": 1, "nodes": {
        "photo": {"type": "LoadImag", "inputs": {"path": "x.png"}},
        "edges": {"type": "Canny", "inputs": {"image": {"from": "photo.image"}, "low": 300, "radius": 1}}}}
    (workspace / "bad.json").write_text(json.dumps(document))
    assert main(["validate", "bad.json"]) == 1
    out = capsys.readouterr().out
    assert "bad.json: 3 problems" in out
    assert "[unknown_node_type] node 'photo': no node type named 'LoadImag'; did you mean 'LoadImage'?" in out
    assert "[value_out_of_range] node 'edges', input 'low'" in out and "[unknown_input] node 'edges'" in out
    assert main(["validate", "bad.json", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["valid"] is False
    assert [(e["code"], e["node"], e["input"]) for e in report["errors"]] == [
        ("unknown_node_type", "photo", None), ("unknown_input", "edges", "radius"),
        ("value_out_of_range", "edges", "low")]
    assert report["errors"][2]["expected"] == "a value in [0, 255]" and report["errors"][2]["found"] == "300"


def test_validate_accepts_every_shipped_graph(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for path in sorted((workspace / "graphs").rglob("*.json")):
        assert main(["validate", str(path)]) == 0, capsys.readouterr().out


def test_validate_reports_invalid_json_with_its_position(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (workspace / "broken.json").write_text('{"graphflow": 1,\n "nodes": {,}}')
    assert main(["validate", "broken.json", "--json"]) == 1
    [error] = json.loads(capsys.readouterr().out)["errors"]
    assert error["code"] == "invalid_json" and "line 2, column 12" in error["message"]


def test_nodes_json_describes_every_input(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["nodes", "--json"]) == 0
    nodes = {node["type"]: node for node in json.loads(capsys.readouterr().out)}
    assert {"LoadImage", "SaveImage", "Canny", "MaskBlend", "Int", "Math"} <= set(nodes)
    low = next(spec for spec in nodes["Canny"]["inputs"] if spec["name"] == "low")
    assert (low["type"], low["default"], low["min"], low["max"]) == ("INT", 100, 0, 255)
    assert nodes["SaveImage"]["output_node"] is True
    assert main(["nodes"]) == 0
    assert "Math (primitive, v1.0.0)" in capsys.readouterr().out


def test_schema_validates_the_shipped_graphs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    validator = jsonschema.Draft202012Validator(schema)
    for path in sorted(GRAPHS.rglob("*.json")):
        assert list(validator.iter_errors(json.loads(path.read_text()))) == [], path


def test_plugin_option_adds_node_types(workspace: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    (workspace / "my_nodes.py").write_text(
        "from graphflow import Input, Node, Output\n\n\n"
        "class Shout(Node):\n"
        '    """Upper-case text."""\n\n'
        '    inputs = (Input("text", "STRING"),)\n'
        '    outputs = (Output("text", "STRING"),)\n\n'
        "    def run(self, ctx, text):\n"
        '        return {"text": text.upper()}\n\n\n'
        "NODES = (Shout,)\n")
    monkeypatch.syspath_prepend(str(workspace))
    (workspace / "shout.json").write_text(json.dumps({"graphflow": 1, "nodes": {
        "s": {"type": "Shout", "inputs": {"text": "hi"}}}, "outputs": {"text": "s.text"}}))
    assert main(["validate", "shout.json"]) == 1
    capsys.readouterr()
    assert main(["--plugin", "my_nodes", "run", "shout.json", "--quiet"]) == 0
    assert "text = 'HI'" in capsys.readouterr().out
    assert main(["--plugin", "no_such_module", "nodes"]) == 1
    assert "cannot import plugin module 'no_such_module'" in capsys.readouterr().err


def test_validate_imports_no_heavy_library() -> None:
    code = ("import sys; from graphflow.cli import main; "
            f"rc = main(['validate', {str(GRAPHS / 'canny_blend.json')!r}]); "
            "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'cv2') if m in sys.modules]; "
            "print(rc, heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("0 []")


def test_cache_dir_carries_expensive_results_to_the_next_run(workspace: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    args = ["run", "graphs/canny_blend.json", "--cache-dir", "cache", "--quiet"]
    assert main(args) == 0
    assert "ran 5 nodes, 0 from cache" in capsys.readouterr().out
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "ran 4 nodes, 1 from cache" in out and "canny_blend_00001.png" in out


def test_make_tiny_models_writes_loadable_diffusers_folders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["make-tiny-models", str(tmp_path / "tiny")]) == 0
    assert "sd15, sd15-inpaint, sdxl" in capsys.readouterr().out
    for name in ("sd15", "sd15-inpaint", "sdxl"):
        assert json.loads((tmp_path / "tiny" / name / "model_index.json").read_text())["unet"][1] == \
            "UNet2DConditionModel"
    assert (tmp_path / "tiny" / "controlnet-canny" / "diffusion_pytorch_model.safetensors").is_file()
    size = sum(file.stat().st_size for file in (tmp_path / "tiny").rglob("*") if file.is_file())
    assert size < 20 << 20
    assert not list((tmp_path / "tiny").glob(".*"))  # no staging folder left behind


def test_the_readme_demo_renders_offline_on_tiny_models(workspace: Path, tiny_models: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("GRAPHFLOW_TINY_MODELS", str(tiny_models))
    assert main(["run", "graphs/demo.json", "--quiet", "--set", "x=1"]) == 1  # the demo has no params
    assert main(["run", "graphs/demo.json", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "ran 10 nodes, 0 from cache" in out and "image = Tensor [1, 96, 128, 3]" in out
    assert Image.open(workspace / "output" / "demo_00000.png").size == (128, 96)


@pytest.mark.parametrize("option", ["--memory-cache-mb", "--model-memory-mb"])
def test_memory_bounds_must_be_positive(workspace: Path, option: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["run", "graphs/canny_blend.json", option, "0"])
    assert exited.value.code == 2
    assert "positive number of megabytes" in capsys.readouterr().err
