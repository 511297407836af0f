"""Sweeps: a template's params varied over a grid, read from command-line text into a `Batch`, and the folder
each job writes into, named from its index and varied params so the params can be read back.

    batch = sweep_batch(document, grid=["seed=0..3", "style=modern,industrial"], fixed=["steps=4"])
    job_folder(3, {"seed": 3, "style": "industrial"}, width=4)   # '0003_seed=3_style=industrial'

`graphflow.sweep_runner` runs the jobs (`run_sweep`); the expansion itself is `graphflow.batches.expand`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote_plus, unquote_plus

from graphflow import types
from graphflow.batches import Batch, batch_errors, param_errors
from graphflow.document import migrate
from graphflow.errors import Code, GraphError, ValidationError
from graphflow.node import Input
from graphflow.templates import parse_assignments, parse_list_text, parse_params, unknown_param_error

_RANGE = re.compile(r"\s*(-?\d+)\s*\.\.\s*(-?\d+)\s*(?:\.\.\s*(-?\d+)\s*)?")
_VALUE_CHARS = 32  # a value longer than this in a folder name is shortened (and marked with ~ and a digest)
_SHORTENED = re.compile(r"~[0-9a-f]{8}")


def parse_grid(specs: Mapping[str, Input], text: str) -> tuple[str, list[Any]]:
    """`NAME=VALUES` read by the param's type: `1,2,3`, a JSON list (`["a, b","c"]`), and for INT params inclusive
    ranges `0..7` or `0..20..5` (with a step), which may be mixed with single values (`0..3,10`). A list param's
    values are a JSON list of lists (`[[1,2],[3]]`). ValidationError saying what is wrong."""
    name, equals, values_text = text.partition("=")
    spec = specs.get(name)
    if not equals:
        raise ValidationError([_error("write --grid NAME=V1,V2,...", text, "NAME=V1,V2,...", text)])
    if spec is None:
        raise ValidationError([unknown_param_error(name, dict(specs))])
    try:
        return name, _grid_values(spec, values_text)
    except ValueError as error:
        raise ValidationError([_error(f"cannot read {values_text!r} as values of param '{name}': {error}", name,
                                      _expected(spec), values_text)]) from None


def _grid_values(spec: Input, text: str) -> list[Any]:
    if spec.list:
        values = json.loads(text) if text.strip().startswith("[") else None
        if not isinstance(values, list) or not all(isinstance(value, list) for value in values):
            raise ValueError("a list param's values are a JSON list of lists, e.g. [[1,2],[3,4]]")
        return values
    if spec.type != types.INT or text.strip().startswith("["):
        if _RANGE.fullmatch(text) or any(_RANGE.fullmatch(part) for part in text.split(",")):
            raise ValueError(f"ranges (a..b) are for INT params; list {spec.type} values with commas")
        values = parse_list_text(spec.type, text)
    else:
        values = [value for part in text.split(",") for value in _int_values(part)]
    if not values:
        raise ValueError("no values")
    return values


def _int_values(part: str) -> list[int]:
    """One comma-separated part of an INT grid: a whole number or an inclusive range `a..b[..step]`."""
    match = _RANGE.fullmatch(part)
    if match is None:
        return [types.parse_text(types.INT, part.strip())]
    start, stop = int(match[1]), int(match[2])
    step = int(match[3]) if match[3] is not None else (1 if stop >= start else -1)
    if step == 0 or (stop - start) * step < 0:
        raise ValueError(f"the step {step} never gets from {start} to {stop}")
    return list(range(start, stop + (1 if step > 0 else -1), step))


def sweep_batch(document: dict[str, Any], *, grid: Sequence[str] = (), zips: Sequence[str] = (),
                fixed: Sequence[str] = (), repeat: int = 1) -> Batch:
    """The batch that `--grid`, `--zip NAME,NAME`, `--set` and `--repeat` describe: each `zips` entry names grid
    params zipped into one group, every other grid param is a group of its own (in `grid` order, the first varying
    slowest). ValidationError listing every problem, values checked against the document's params."""
    document = migrate(dict(document))
    specs, errors = parse_params(document)
    if errors:
        raise ValidationError(errors)
    values: dict[str, list[Any]] = {}
    unread: set[str] = set()  # grid params whose values could not be read: a --zip naming them is not wrong too
    for text in grid:
        try:
            name, parsed = parse_grid(specs, text)
        except ValidationError as error:
            errors.extend(error.errors)
            unread.add(text.partition("=")[0])
            continue
        if name in values:
            errors.append(_error(f"param '{name}' is given twice with --grid", name, "one --grid per param", text))
            continue
        values[name] = parsed
    fixed_values: dict[str, Any] = {}
    for assignment in fixed:  # one at a time: the values that can be read are checked against the grids too
        try:
            fixed_values.update(parse_assignments(document, [assignment]))
        except ValidationError as error:
            errors.extend(error.errors)
    zipped, zip_errors = _zip_groups(zips, values, unread)
    errors.extend(zip_errors)
    in_zips = {name for group in zipped for name in group}
    groups = [{name: values[name] for name in group if name in values} for group in zipped]
    groups += [{name: parsed} for name, parsed in values.items() if name not in in_zips]
    batch = Batch(tuple(group for group in groups if group), repeat, fixed_values)
    errors.extend(batch_errors(batch))
    errors.extend(_summarised(param_errors(batch, document)))
    if errors:
        raise ValidationError(errors)
    return batch


def _summarised(errors: list[GraphError]) -> list[GraphError]:
    """`errors` with those of one grid's values alike (`a=0..200` past a max of 100) told once, with a count."""
    kept: dict[tuple[str, str], tuple[GraphError, int]] = {}
    for error in errors:
        place = (error.code, re.sub(r"\[\d+\]$", "", error.input or ""))
        first, count = kept.get(place, (error, 0))
        kept[place] = (first, count + 1)
    return [error if count == 1 else dataclasses.replace(error, message=f"{error.message} (and {count - 1} more "
                                                          "values of this grid alike)")
            for error, count in kept.values()]


def _zip_groups(zips: Sequence[str], values: Mapping[str, list[Any]],
                unread: set[str]) -> tuple[list[list[str]], list[GraphError]]:
    groups: list[list[str]] = []
    errors: list[GraphError] = []
    seen: set[str] = set()
    for text in zips:
        names = [name.strip() for name in text.split(",") if name.strip()]
        if len(names) < 2:
            errors.append(_error("--zip names two or more --grid params, e.g. --zip seed,prompt", text,
                                 "NAME,NAME[,...]", text))
        for name in names:
            if name in unread:
                continue
            if name not in values:
                errors.append(_error(f"--zip names '{name}', which no --grid gives values", name,
                                     f"one of {', '.join(values) or '(no --grid params)'}", text))
            elif name in seen:
                errors.append(_error(f"param '{name}' is in two --zip groups", name, "one --zip per param", text))
            seen.add(name)
        groups.append(names)
    return groups, errors


def varied_names(batch: Batch) -> list[str]:
    """The params the batch varies, in its group order: what names a job's folder and labels its picture."""
    return [name for group in batch.groups for name in group]


def job_folder(index: int, varied: Mapping[str, Any], width: int) -> str:
    """The folder of job `index`: `0003_seed=3_style=industrial`. Values are URL-encoded (`a+red+house`), so
    `read_job_folder` gives them back; one longer than 32 characters is shortened to its start, `~` and a digest."""
    parts = [f"{index:0{width}d}", *(f"{name}={_encoded(value)}" for name, value in varied.items())]
    return "_".join(parts)


def _encoded(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    encoded = quote_plus(text, safe=",").replace("~", "%7E")  # a ~ in a name marks a shortened value
    if len(encoded) <= _VALUE_CHARS:
        return encoded
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=4).hexdigest()
    start = re.sub(r"%[0-9A-F]?$", "", encoded[:_VALUE_CHARS - 9])  # never half an escape
    return f"{start}~{digest}"


def read_job_folder(folder: str, specs: Mapping[str, Input], names: Sequence[str]) -> tuple[int, dict[str, Any]]:
    """The index and varied param values that `job_folder` wrote into `folder`, the params `names` in that order;
    ValueError when the name is not such a folder or a value was shortened (sweep.json has it whole)."""
    index_text, _, rest = folder.partition("_")
    if not index_text.isdigit():
        raise ValueError(f"{folder!r} does not start with a job index")
    values: dict[str, Any] = {}
    for position, name in enumerate(names):
        prefix = f"{name}="
        if not rest.startswith(prefix):
            raise ValueError(f"{folder!r} has no value for param '{name}' where expected")
        rest = rest[len(prefix):]
        following = f"_{names[position + 1]}=" if position + 1 < len(names) else None
        text, _, rest = rest.partition(following) if following else (rest, "", "")
        rest = following[1:] + rest if following else rest
        if _SHORTENED.search(text):
            raise ValueError(f"the value of '{name}' was shortened in the folder name; sweep.json has it")
        values[name] = _decoded(specs[name], unquote_plus(text))
    return int(index_text), values


def _decoded(spec: Input, text: str) -> Any:
    if spec.list or (spec.type != types.STRING and text.startswith("[")):
        return json.loads(text)
    return text if spec.type == types.STRING else types.parse_text(spec.type, text)


def _expected(spec: Input) -> str:
    if spec.list:
        return f"a JSON list of lists of {spec.type}"
    ranges = ", or ranges a..b[..step]" if spec.type == types.INT else ""
    return f"{spec.type} values separated by commas or a JSON list{ranges}"


def _error(message: str, input: str, expected: str, found: str) -> GraphError:
    return GraphError(Code.INVALID_VALUE, message, None, input, expected, repr(found))
