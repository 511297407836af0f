"""Batches: param values expanded into jobs, as InvokeAI's batches expand them.

A batch is a list of *groups*, each naming params with a list of values. The lists of one group are zipped
(so they must be of equal length: seeds and prompts that go together), the groups are multiplied (a cartesian
product, the first group varying slowest), and the whole product is repeated `repeat` times. `fixed` values join
every job. `graphflow sweep`, `graphflow serve` and the Ray backend all expand batches here.

    expand(Batch(groups=({"seed": [1, 2]}, {"style": ["a", "b"]}), fixed={"steps": 4}))
    # four jobs: seed 1 with styles a and b, then seed 2 with a and b, each with steps 4
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from graphflow import types
from graphflow.errors import Code, GraphError, ValidationError

MAX_JOBS = 100_000  # a batch is expanded in memory; real sweeps are tens to thousands of jobs


@dataclass(frozen=True)
class Batch:
    """Param values for many jobs: `groups` (zipped within, multiplied across), `repeat`, and `fixed` values."""

    groups: tuple[Mapping[str, Sequence[Any]], ...] = ()
    repeat: int = 1
    fixed: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any) -> Batch:
        """A batch from its JSON form, `{"groups": [{NAME: [VALUE, ...], ...}, ...], "repeat": N, "fixed": {...}}`;
        ValidationError listing every problem of its shape."""
        errors = _shape_errors(data)
        if errors:
            raise ValidationError(errors)
        return cls(tuple(data.get("groups", ())), data.get("repeat", 1), data.get("fixed", {}))

    def size(self) -> int:
        """How many jobs the batch expands to (0 when a group is empty)."""
        lengths = [len(next(iter(group.values()))) if group else 1 for group in self.groups]
        return math.prod(lengths) * self.repeat


def expand(batch: Batch) -> list[dict[str, Any]]:
    """The param values of each job, in order; ValidationError listing every problem of the batch."""
    errors = batch_errors(batch)
    if errors:
        raise ValidationError(errors)
    zipped = [[dict(zip(group, values, strict=True)) for values in zip(*group.values(), strict=True)]
              for group in batch.groups]
    product = [dict(batch.fixed, **{name: value for part in parts for name, value in part.items()})
               for parts in itertools.product(*zipped)]
    return product * batch.repeat


def batch_errors(batch: Batch) -> list[GraphError]:
    """Every problem of a batch: unequal lists in a group, a param given twice, a bad repeat, too many jobs."""
    errors: list[GraphError] = []
    if type(batch.repeat) is not int or batch.repeat < 1:
        errors.append(_error("repeat is a whole number of runs, at least 1", "repeat", "an integer >= 1",
                             batch.repeat))
    seen = {name: "fixed" for name in batch.fixed}
    for index, group in enumerate(batch.groups):
        where = f"groups[{index}]"
        unlisted = [name for name, values in group.items() if not isinstance(values, (list, tuple))]
        errors.extend(_error(f"param '{name}' in {where} needs a list of values", name, "a list", group[name])
                      for name in unlisted)
        if not group:
            errors.append(_error("a group names at least one param", where, "a param", "{}"))
        if unlisted or not group:
            continue
        lengths = {name: len(values) for name, values in group.items()}
        if len(set(lengths.values())) > 1:
            shown = ", ".join(f"{name} has {length}" for name, length in lengths.items())
            errors.append(_error(f"the lists of one group are zipped, so they must be equally long: {shown}", where,
                                 "lists of one length", shown))
        for name in group:
            if name in seen:
                errors.append(_error(f"param '{name}' is given in {seen[name]} and in {where}; give each param in "
                                     "one place", name, "one place per param", f"{seen[name]} and {where}"))
            seen.setdefault(name, where)
    if not errors and (size := batch.size()) > MAX_JOBS:
        errors.append(_error(f"the batch expands to {size:,} jobs", "groups", f"at most {MAX_JOBS:,}", f"{size:,}"))
    return errors


def param_errors(batch: Batch, document: dict[str, Any]) -> list[GraphError]:
    """Every value of the batch checked against the params `document` declares (names, types, ranges, choices),
    each value once, before any job is made: what compiling each job would report about its values."""
    from graphflow.templates import param_value_errors, parse_params, unknown_param_error

    specs, declaration_errors = parse_params(document)
    errors = list(declaration_errors)
    places = [("fixed", batch.fixed, False), *((f"groups[{index}]", group, True)
                                               for index, group in enumerate(batch.groups))]
    for where, values, listed in places:
        for name, given in values.items():
            spec = specs.get(name)
            if spec is None:
                errors.append(unknown_param_error(name, specs))
                continue
            for position, value in enumerate(given if listed else [given]):
                at = f"{where}.{name}[{position}]" if listed else f"{where}.{name}"
                errors.extend(dataclasses.replace(error, input=at) for error in param_value_errors(spec, value))
    return errors


def _shape_errors(data: Any) -> list[GraphError]:
    if not isinstance(data, Mapping):
        return [_error("a batch is an object with groups, repeat and fixed", "batch", "an object", data)]
    errors = [_error(f"unknown batch key '{key}'", str(key), "groups, repeat or fixed", key)
              for key in data if key not in ("groups", "repeat", "fixed")]
    groups = data.get("groups", [])
    if not isinstance(groups, list):
        return [*errors, _error("groups is a list of objects", "groups", "a list", groups)]
    for index, group in enumerate(groups):
        if not isinstance(group, Mapping) or not group:
            errors.append(_error("a group maps param names to lists of values", f"groups[{index}]",
                                 "a non-empty object", group))
            continue
        errors.extend(_error(f"param '{name}' in groups[{index}] needs a list of values", str(name), "a list",
                             values) for name, values in group.items() if not isinstance(values, list))
    if not isinstance(data.get("fixed", {}), Mapping):
        errors.append(_error("fixed maps param names to values", "fixed", "an object", data["fixed"]))
    return errors


def _error(message: str, input: str, expected: str, found: Any) -> GraphError:
    return GraphError(Code.INVALID_VALUE, message, None, input, expected,
                      found if isinstance(found, str) else types.describe_literal(found))
