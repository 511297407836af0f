"""Odd Unicode from documents (lone surrogates, NUL, right-to-left overrides, escape sequences, combining marks,
very long names) prints safely: one line per problem, on a stdout of any encoding, in text and in JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from graphflow.errors import SHOWN_CHARACTERS, GraphError, printable

ODD = {"surrogate": "\ud800", "nul": "a\x00b", "rtl": "\u202eevil", "escape": "\x1b[2J", "combining": "e\u0301",
       "newline": "a\nb", "long": "x" * 5000 + "!"}
DOCUMENT = {
    "graphflow": 1, "name": "caf\u00e9 \ud800",
    "params": {"p\u202e": {"type": "INT"}, "text": {"type": "STRING", "default": "caf\u00e9 \ud800 \x1b[2J"}},
    "nodes": {**{name: {"type": "Int"} for name in ODD.values()},
              "link": {"type": "Int", "inputs": {"value": {"from": "caf\u00e9.value"}, "v\x1b[31m": 1}},
              "text": {"type": "String", "inputs": {"value": {"param": "text"}}},
              "file": {"type": "LoadImage", "inputs": {"path": "\ud800\u202e.png"}}},
    "outputs": {"text": "text.value", "image": "file.image"},
}
# Three commands in one process per encoding: validate, validate --json, and run (which fails on the file)
SCRIPT = """
import sys
from graphflow.cli import main
for command in (["validate", sys.argv[1]], ["validate", sys.argv[1], "--json"], ["run", sys.argv[1], "--quiet"]):
    print("=== exit", main(command), flush=True)
"""


def _graphflow(tmp_path: Path, encoding: str) -> subprocess.CompletedProcess[bytes]:
    path = tmp_path / "odd.json"
    path.write_text(json.dumps(DOCUMENT), encoding="ascii")
    environment = {**os.environ, "PYTHONIOENCODING": f"{encoding}:strict", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", SCRIPT, str(path)], capture_output=True, env=environment,
                          cwd=tmp_path, timeout=120, check=False)


def test_odd_names_print_safely_whatever_the_encoding_of_stdout(tmp_path: Path) -> None:
    for encoding in ("ascii", "utf-8"):
        finished = _graphflow(tmp_path, encoding)
        out, err = finished.stdout.decode(encoding), finished.stderr.decode(encoding)
        assert "Traceback" not in out + err and finished.returncode == 0, err
        assert out.count("=== exit 1\n") == 3  # each command found the document invalid
        text, report = out.split("=== exit 1\n")[:2]
        header, *lines = text.splitlines()
        assert header.endswith(f"odd.json: {len(lines)} problems") and all(line.startswith("  [") for line in lines)
        assert "node '\\ud800'" in text and "node '\\u202eevil'" in text and "node 'a\\x00b'" in text
        assert "\x1b" not in text and "\u202e" not in text and "more characters)" in text
        assert ("caf\u00e9" if encoding == "utf-8" else "caf\\xe9") in text  # printable text stays itself
        errors = json.loads(report)["errors"]
        assert {error["node"] for error in errors} >= set(ODD.values())  # the JSON report keeps names whole
        assert "[invalid_node_id] node '\\ud800'" in err  # what `graphflow run` says on stderr


@settings(max_examples=200, deadline=None, database=None, derandomize=True)
@given(st.text(st.characters(codec=None, exclude_categories=())))
def test_printable_text_is_one_printable_line_of_bounded_length(text: str) -> None:
    shown = printable(text)
    assert shown.isprintable() and len(shown) <= 10 * SHOWN_CHARACTERS + 40
    assert shown.encode("utf-8").decode("utf-8") == shown  # no lone surrogates left to break an encoder
    line = str(GraphError("invalid_value", text, text, text, text, text))  # type: ignore[arg-type]
    assert line.isprintable()
