"""A submit checked before anything is queued: the document, each job's param values and file paths, with every
problem listed; then the jobs (a batch expanded by graphflow.batches) ready for the queue."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from graphflow.batches import Batch, batch_errors, expand, param_errors
from graphflow.errors import GraphError, ValidationError, did_you_mean
from graphflow.planning import path_errors
from graphflow.service.config import TemplateInfo
from graphflow.service.queue import NewJob
from graphflow.service.worker import model_sources

MAX_JOBS_PER_SUBMIT = 10_000  # each job is compiled at submit


class SubmitError(Exception):
    """A refused submit: a message and every validation problem (HTTP 422)."""

    def __init__(self, message: str, errors: list[GraphError] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.errors = errors or []


def prepare_jobs(engine: Any, templates: Mapping[str, TemplateInfo], *, template: str | None,
                 document: dict[str, Any] | None, params: dict[str, Any] | None, batch: dict[str, Any] | None,
                 options: dict[str, Any], priority: int) -> list[NewJob]:
    """The jobs of one submit, each compiled by `engine` (whose roots bound every path); SubmitError otherwise."""
    if (template is None) == (document is None):
        raise SubmitError('give either "template" (a name from GET /api/templates) or "document", not both')
    if params is not None and batch is not None:
        raise SubmitError('give either "params" (one job) or "batch" (many), not both')
    source: Path | dict[str, Any]
    if template is not None:
        info = templates.get(template)
        if info is None:
            raise SubmitError(f"no template '{template}' in the graphs folder{did_you_mean(template, templates)}")
        source, document = info.path, info.document
    elif document is not None:
        source = document
    values = _param_sets(document, params, batch)
    models: dict[str, list[str]] = {}
    problems: dict[str, GraphError] = {}
    for text in dict.fromkeys(json.dumps(job, sort_keys=True) for job in values):
        try:
            compiled = engine.compile(source, json.loads(text))
        except ValidationError as error:
            problems.update((json.dumps(e.to_json(), sort_keys=True), e) for e in error.errors)
            continue
        problems.update((json.dumps(e.to_json(), sort_keys=True), e) for e in _path_errors(engine, compiled))
        models[text] = model_sources(compiled)
    if problems:
        raise SubmitError(f"the {'batch' if batch is not None else 'job'} is not valid: {len(problems)} problem"
                          f"{'s' if len(problems) != 1 else ''}", list(problems.values()))
    return [NewJob(document, job, options, template, priority, tuple(models[json.dumps(job, sort_keys=True)]))
            for job in values]


def _param_sets(document: dict[str, Any], params: dict[str, Any] | None,
                batch: dict[str, Any] | None) -> list[dict[str, Any]]:
    if batch is None:
        return [dict(params or {})]
    try:
        parsed = Batch.from_json(batch)
    except ValidationError as error:
        raise SubmitError("the batch is not valid", error.errors) from None
    errors = batch_errors(parsed) or param_errors(parsed, document)
    if errors:
        raise SubmitError("the batch is not valid", errors)
    if parsed.size() > MAX_JOBS_PER_SUBMIT:
        raise SubmitError(f"the batch expands to {parsed.size():,} jobs; one submit takes at most "
                          f"{MAX_JOBS_PER_SUBMIT:,}")
    if parsed.size() == 0:
        raise SubmitError("the batch expands to no job (a group with empty lists)")
    return expand(parsed)


def _path_errors(engine: Any, compiled: Any) -> list[GraphError]:
    """The literal paths of file inputs (inside the input roots) and of output paths (under the output folder)
    checked now, not when the job runs."""
    return path_errors(compiled, engine.paths)
