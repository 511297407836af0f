"""Batches expand param values into jobs as InvokeAI's do: lists zipped within a group, groups multiplied, the
product repeated, fixed values in every job; every problem reported at once."""

from __future__ import annotations

import pytest

from graphflow import Engine, ValidationError
from graphflow.batches import MAX_JOBS, Batch, expand, param_errors

TEMPLATE = {"graphflow": 1, "params": {
    "seed": {"type": "INT", "default": 0, "min": 0},
    "prompt": {"type": "STRING", "default": "a room"},
    "style": {"type": "STRING", "default": "modern", "choices": ["modern", "industrial"]},
    "seeds": {"type": "INT", "list": True, "default": [0]},
}, "nodes": {"join": {"type": "JoinText", "inputs": {"texts": [{"param": "prompt"}, {"param": "style"}]}}},
    "outputs": {"text": "join.text"}}


def test_groups_zip_within_and_multiply_across_and_the_product_repeats() -> None:
    batch = Batch(groups=({"seed": [1, 2], "prompt": ["p1", "p2"]}, {"style": ["modern", "industrial"]}),
                  repeat=2, fixed={"steps": 4})
    jobs = expand(batch)
    assert batch.size() == len(jobs) == 8
    assert jobs[:4] == [
        {"steps": 4, "seed": 1, "prompt": "p1", "style": "modern"},
        {"steps": 4, "seed": 1, "prompt": "p1", "style": "industrial"},
        {"steps": 4, "seed": 2, "prompt": "p2", "style": "modern"},
        {"steps": 4, "seed": 2, "prompt": "p2", "style": "industrial"},
    ]
    assert jobs[4:] == jobs[:4]


def test_no_groups_is_one_job_of_the_fixed_values_and_an_empty_list_none() -> None:
    assert expand(Batch(fixed={"seed": 3})) == [{"seed": 3}]
    assert expand(Batch(groups=({"seed": []},))) == []


def test_every_problem_of_a_batch_is_reported_at_once() -> None:
    batch = Batch(groups=({"seed": [1, 2], "prompt": ["only one"]}, {"seed": [5]}, {"style": "modern"}, {}),
                  repeat=0, fixed={"prompt": "x"})
    with pytest.raises(ValidationError) as caught:
        expand(batch)
    messages = [error.message for error in caught.value.errors]
    assert len(messages) == 6
    assert "repeat is a whole number" in messages[0]
    assert "equally long: seed has 2, prompt has 1" in messages[1]
    assert "'prompt' is given in fixed and in groups[0]" in messages[2]
    assert "'seed' is given in groups[0] and in groups[1]" in messages[3]
    assert "needs a list of values" in messages[4] and "names at least one param" in messages[5]


def test_a_batch_too_large_to_expand_is_refused_before_it_is_built() -> None:
    batch = Batch(groups=({"seed": list(range(1000))}, {"cfg": list(range(1000))}))
    with pytest.raises(ValidationError) as caught:
        expand(batch)
    assert f"at most {MAX_JOBS:,}" == caught.value.errors[0].expected


def test_the_json_form_is_checked_for_shape() -> None:
    batch = Batch.from_json({"groups": [{"seed": [1, 2]}], "repeat": 3, "fixed": {"style": "modern"}})
    assert batch.size() == 6
    with pytest.raises(ValidationError) as caught:
        Batch.from_json({"groups": [{"seed": 1}, "x"], "runs": 2, "fixed": []})
    assert len(caught.value.errors) == 4
    with pytest.raises(ValidationError):
        Batch.from_json([1, 2])


def test_values_are_checked_against_the_documents_params_each_once() -> None:
    batch = Batch(groups=({"seed": [1, -1], "style": ["modern", "baroque"]}, {"seeds": [[1, 2], 3]}),
                  fixed={"colour": "red", "prompt": 5})
    errors = param_errors(batch, TEMPLATE)
    found = [(error.code, error.input) for error in errors]
    assert found == [("unknown_param", "colour"), ("invalid_value", "fixed.prompt"),
                     ("value_out_of_range", "groups[0].seed[1]"), ("value_not_in_choices", "groups[0].style[1]"),
                     ("invalid_value", "groups[1].seeds[1]")]
    assert param_errors(Batch(groups=({"seed": [1, 2]},)), TEMPLATE) == []


def test_expanded_jobs_run_through_one_engine_sharing_what_does_not_change() -> None:
    engine = Engine()
    jobs = expand(Batch(groups=({"style": ["modern", "industrial"]},), repeat=2, fixed={"prompt": "a loft"}))
    texts = [engine.run(TEMPLATE, job).outputs["text"] for job in jobs]
    assert texts == ["a loft, modern", "a loft, industrial"] * 2
