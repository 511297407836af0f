"""`graphflow show` draws graphs as SVG, DOT and Mermaid with every name escaped; `graphflow params` lists params."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from graphflow.cli import main
from graphflow.document import dumps, load_document

GRAPHS = sorted((Path(__file__).parents[2] / "graphs").glob("*.json"))
SVG = "{http://www.w3.org/2000/svg}"
DOT = shutil.which("dot")  # Graphviz, where installed: the DOT output must be what it parses

# a Mermaid flowchart as drawing.mermaid writes it: boxes n0, n1, ... with quoted labels, and labelled links; a label
# holds no quote, no markup but the <br> line breaks, and writes other characters as entity codes (#34;)
_LABEL = r'(?:[^"<>&\n]|<br>)*'
_MERMAID_LINE = re.compile(rf'flowchart LR|  n\d+(?:\["{_LABEL}"\]|\(\["{_LABEL}"\]\)|\[\["{_LABEL}"\]\])'
                           rf'|  n\d+ (?:-->|-\.->)\|"{_LABEL}"\| n\d+')


def _boxes(document: dict) -> int:
    return len(document["nodes"]) + len(document.get("params", {})) + len(document.get("outputs", {}))


def _show(tmp_path: Path, graph: Path, suffix: str) -> str:
    target = tmp_path / f"g{suffix}"
    assert main(["show", str(graph), "-o", str(target)]) == 0
    return target.read_text()


def _dot_texts(text: str) -> list[str]:
    """What Graphviz draws for DOT `text`: every text line of its SVG rendering."""
    rendered = subprocess.run([DOT, "-Tsvg"], input=text, capture_output=True, text=True, check=True).stdout
    return [element.text or "" for element in ElementTree.fromstring(rendered).iter(f"{SVG}text")]


@pytest.mark.parametrize("graph", GRAPHS, ids=[path.name for path in GRAPHS])
def test_every_example_draws_in_each_format(graph: Path, tmp_path: Path) -> None:
    document = load_document(graph)

    svg = ElementTree.fromstring(_show(tmp_path, graph, ".svg"))
    boxes = [group.get("data-node") for group in svg.iter(f"{SVG}g")]
    assert set(document["nodes"]) <= set(boxes) and len(boxes) == _boxes(document)
    links = sum(1 for entry in document["nodes"].values() for value in entry.get("inputs", {}).values()
                for item in (value if isinstance(value, list) else [value]) if isinstance(item, dict))
    assert len(list(svg.iter(f"{SVG}path"))) == links + len(document.get("outputs", {}))

    dot = _show(tmp_path, graph, ".dot")
    assert dot.startswith("digraph ") and dot.count(" -> ") == links + len(document.get("outputs", {}))
    if DOT:
        assert set(document["nodes"]) <= set(_dot_texts(dot))

    mermaid = _show(tmp_path, graph, ".mmd").splitlines()
    assert [line for line in mermaid if not _MERMAID_LINE.fullmatch(line)] == []
    assert sum(1 for line in mermaid if "|" not in line) - 1 == _boxes(document)


HOSTILE = 'a "quote" <b>x</b> & co\nline two \\N \\" #35; ]) end'


@pytest.fixture
def hostile(tmp_path: Path) -> Path:
    """A document whose name, literal values, param default and description try to break out of each format."""
    path = tmp_path / "hostile.json"
    path.write_text(dumps({
        "graphflow": 1, "name": HOSTILE,
        "params": {"label": {"type": "STRING", "default": HOSTILE, "description": HOSTILE}},
        "nodes": {
            "end": {"type": "String", "inputs": {"value": HOSTILE}},
            "graph": {"type": "String", "inputs": {"value": {"param": "label"}}},
        },
        "outputs": {"subgraph": "end.value", "style": "graph.value"},
    }))
    return path


def test_names_and_values_cannot_break_out_of_svg(hostile: Path, tmp_path: Path) -> None:
    svg = ElementTree.fromstring(_show(tmp_path, hostile, ".svg"))  # well-formed XML, whatever the text held

    assert not list(svg.iter(f"{SVG}b"))  # the <b> stayed text
    texts = [element.text for element in svg.iter(f"{SVG}text")]
    assert svg.find(f"{SVG}title").text == HOSTILE.replace("\n", "\\n")
    assert any(text.startswith('value = "a \\"quote\\" <b>') for text in texts)  # shortened to fit its box


def test_names_and_values_cannot_break_out_of_dot(hostile: Path, tmp_path: Path) -> None:
    dot = _show(tmp_path, hostile, ".dot")

    assert len(dot.splitlines()) == 4 + 5 + 3 + 1  # header, 5 boxes, 3 links, "}": no line broken by the text
    assert dot.splitlines()[0] == 'digraph "a \\"quote\\" <b>x</b> & co\\\\nline two \\\\N \\\\\\" #35; ]) end" {'
    if DOT:
        texts = _dot_texts(dot)
        assert "end" in texts and "graph" in texts  # DOT keywords as ids, quoted
        assert 'STRING = "a \\"quote\\" <b>x</b> & co\\nline two \\\\…' in texts  # as JSON, shortened


def test_names_and_values_cannot_break_out_of_mermaid(hostile: Path, tmp_path: Path) -> None:
    lines = _show(tmp_path, hostile, ".mmd").splitlines()

    assert all(_MERMAID_LINE.fullmatch(line) for line in lines), lines
    assert len(lines) == 1 + 5 + 3
    assert "#34;a #92;#34;quote#92;#34; #60;b#62;x#60;/b#62; #38; co#92;nline two" in lines[1]  # the param's default
    assert "end" not in re.findall(r"\bn\d+|\bend\b", "\n".join(line.split('"')[0] for line in lines))


def test_show_refuses_an_unknown_format_and_an_invalid_document(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", str(GRAPHS[0]), "-o", str(tmp_path / "g.pdf")]) == 2
    assert "cannot tell the format" in capsys.readouterr().err
    broken = tmp_path / "broken.json"
    broken.write_text('{"graphflow": 1, "nodes": {"a": {"type": "Cany"}}}')
    assert main(["show", str(broken)]) == 1
    assert "unknown_node_type" in capsys.readouterr().err
    assert not (tmp_path / "g.pdf").exists()


def test_show_prints_dot_without_an_output_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", str(GRAPHS[0])]) == 0
    assert capsys.readouterr().out.startswith("digraph ")


TEMPLATE = {
    "graphflow": 1,
    "params": {
        "steps": {"type": "INT", "default": 20, "description": "denoising steps", "min": 1, "max": 150},
        "seeds": {"type": "INT", "list": True, "default": [0, 1], "description": "one image per seed", "min": 0},
        "scheduler": {"type": "STRING", "default": "ddim", "choices": ["ddim", "euler", "unipc"]},
        "prompt": {"type": "STRING", "description": 'what to draw, "quoted"\nand on two lines'},
    },
    "nodes": {"s": {"type": "Int", "inputs": {"value": {"param": "steps"}}}},
    "outputs": {"steps": "s.value"},
}


@pytest.fixture
def template(tmp_path: Path) -> Path:
    path = tmp_path / "t.json"
    path.write_text(dumps(TEMPLATE))
    return path


def test_params_lists_type_default_range_choices_and_description(template: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["params", str(template)]) == 0

    rows = [re.split(r"\s{2,}", line) for line in capsys.readouterr().out.splitlines()]
    assert rows == [
        ["NAME", "TYPE", "DEFAULT", "RANGE", "CHOICES", "DESCRIPTION"],
        ["steps", "INT", "20", "1..150", "denoising steps"],
        ["seeds", "list of INT", "[0, 1]", "0..", "one image per seed"],
        ["scheduler", "STRING", '"ddim"', '"ddim"|"euler"|"unipc"'],
        ["prompt", "STRING", "(required)", 'what to draw, "quoted"\\nand on two lines'],
    ]


def test_params_json_holds_every_field(template: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["params", str(template), "--json"]) == 0

    params = {param["name"]: param for param in json.loads(capsys.readouterr().out)}
    assert list(params) == ["steps", "seeds", "scheduler", "prompt"]
    steps = {key: params["steps"][key] for key in ("type", "default", "min", "max", "required", "list")}
    assert steps == {"type": "INT", "default": 20, "min": 1, "max": 150, "required": False, "list": False}
    assert params["seeds"]["list"] is True and params["seeds"]["default"] == [0, 1] and "max" not in params["seeds"]
    assert params["scheduler"]["choices"] == ["ddim", "euler", "unipc"]
    assert params["prompt"]["required"] is True and "default" not in params["prompt"]
    assert params["prompt"]["description"] == 'what to draw, "quoted"\nand on two lines'


def test_params_reports_a_bad_declaration(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**TEMPLATE, "params": {"steps": {"type": "INT", "default": "many"}}}))
    assert main(["params", str(bad)]) == 1
    assert "param 'steps'" in capsys.readouterr().err
