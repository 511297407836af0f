"""Primitive nodes used by templates."""

from __future__ import annotations

from graphflow import Engine


def test_join_text_builds_a_prompt_from_a_param_and_fixed_text() -> None:
    document = {"graphflow": 1, "params": {"style": {"type": "STRING", "default": "scandinavian"}}, "nodes": {
        "prompt": {"type": "JoinText", "inputs": {"texts": [{"param": "style"}, "", "interior, soft daylight"]}},
    }, "outputs": {"prompt": "prompt.text"}}
    engine = Engine()
    assert engine.run(document).outputs["prompt"] == "scandinavian, interior, soft daylight"
    assert engine.run(document, {"style": "industrial"}).outputs["prompt"] == "industrial, interior, soft daylight"
