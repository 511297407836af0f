"""Fuzzing: generated and damaged documents validate, or fail with coded GraphErrors, and never crash or hang.

The generators and checks are benchmarks/fuzz_documents.py's (which runs 10,000 documents); here hypothesis
drives them with a small, fixed budget, and shrinks whatever fails to a small example.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.fuzz_documents import (
    GRAPHS,
    assignments,
    cheap_document,
    check_cheap,
    check_document,
    check_generated,
    check_text,
    mutated_text,
    random_document,
)
from graphflow import Engine, default_registry

REGISTRY = default_registry()
ENGINE = Engine(REGISTRY, cache_bytes=16 << 20)
ORIGINALS = [path.read_bytes() for path in sorted(GRAPHS.rglob("*.json"))]
FOLDER = Path(tempfile.mkdtemp(prefix="graphflow-fuzz-"))
FUZZ = settings(max_examples=60, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
RANDOMS = st.randoms(use_true_random=False)  # drawn from hypothesis' data, so failures shrink
ANY_TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=12) | st.sampled_from(
    ["", "\ud800", "\u202e", "e\u0301", "a\x00b", "x" * 3000, "my-param", "class", "a.b", "n0.value"])


@FUZZ
@given(RANDOMS)
def test_structured_documents_validate_or_list_coded_errors(rng: random.Random) -> None:
    check_generated(random_document(rng, REGISTRY), REGISTRY, FOLDER, assignments(rng))


@settings(FUZZ, max_examples=150)
@given(RANDOMS)
def test_damaged_example_graphs_parse_validate_and_print(rng: random.Random) -> None:
    check_text(mutated_text(rng, ORIGINALS), REGISTRY, FOLDER)


@settings(FUZZ, max_examples=40)
@given(RANDOMS)
def test_valid_documents_of_cheap_nodes_run_and_rerun_the_same(rng: random.Random) -> None:
    document = cheap_document(rng)
    check_document(document, REGISTRY)
    check_cheap(document, ENGINE)


def _odd_document(node_id: str, node_type: str, input_name: str, param: str, value: Any) -> dict[str, Any]:
    return {"graphflow": 1, "name": value if isinstance(value, str) else "odd",
            "params": {param: {"type": "STRING", "default": "x"}},
            "nodes": {node_id: {"type": node_type, "inputs": {input_name: value}},
                      "load": {"type": "LoadImage", "inputs": {"path": value if isinstance(value, str) else "x.png"}},
                      "use": {"type": "String", "inputs": {"value": {"param": param}}}},
            "outputs": {"out": f"{node_id}.value"}}


@settings(FUZZ, max_examples=80)
@given(ANY_TEXT, st.sampled_from(["Int", "String", "JoinText"]) | ANY_TEXT, st.sampled_from(["value", "texts"]) |
       ANY_TEXT, ANY_TEXT, ANY_TEXT | st.integers() | st.floats() | st.lists(ANY_TEXT, max_size=3))
def test_odd_unicode_anywhere_validates_and_prints_on_ascii(node_id: str, node_type: str, input_name: str,
                                                             param: str, value: Any) -> None:
    check_generated(_odd_document(node_id, node_type, input_name, param, value), REGISTRY, FOLDER)
