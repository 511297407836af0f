"""Errors users can act on: a code, where it happened, what was expected and what was found."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from difflib import get_close_matches
from enum import StrEnum
from typing import Any


class Code(StrEnum):
    """Every problem graphflow reports has one of these codes."""

    INVALID_JSON = "invalid_json"
    INVALID_DOCUMENT = "invalid_document"
    UNSUPPORTED_VERSION = "unsupported_version"
    INVALID_NODE_ID = "invalid_node_id"
    UNKNOWN_NODE_TYPE = "unknown_node_type"
    UNKNOWN_INPUT = "unknown_input"
    MISSING_REQUIRED_INPUT = "missing_required_input"
    BAD_LINK = "bad_link"
    TYPE_MISMATCH = "type_mismatch"
    INVALID_VALUE = "invalid_value"
    VALUE_OUT_OF_RANGE = "value_out_of_range"
    VALUE_NOT_IN_CHOICES = "value_not_in_choices"
    CYCLE = "cycle"
    UNKNOWN_PARAM = "unknown_param"
    MISSING_PARAM_VALUE = "missing_param_value"
    INVALID_PARAM = "invalid_param"
    NO_OUTPUTS = "no_outputs"
    UNKNOWN_OUTPUT = "unknown_output"
    TEMPLATE_NOT_FOUND = "template_not_found"
    RECURSIVE_TEMPLATE = "recursive_template"
    FILE_NOT_FOUND = "file_not_found"
    PATH_OUTSIDE_ROOT = "path_outside_root"


@dataclass(frozen=True)
class GraphError:
    """One problem in a document, located precisely enough to fix it."""

    code: Code
    message: str
    node: str | None = None
    input: str | None = None
    expected: str | None = None
    found: str | None = None

    def __str__(self) -> str:
        where = ""
        if self.node is not None:
            where = f"node '{self.node}'"
            if self.input is not None:
                where += f", input '{self.input}'"
        elif self.input is not None:
            where = f"'{self.input}'"
        head = f"[{self.code}] {where}: " if where else f"[{self.code}] "
        detail = ""
        if self.expected is not None or self.found is not None:
            detail = f" (expected {self.expected}; found {self.found})"
        return head + self.message + detail

    def to_json(self) -> dict[str, Any]:
        return {key: (str(value) if key == "code" else value) for key, value in asdict(self).items()}


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """A "; did you mean 'x'?" hint naming the closest known name, or "" when none is close."""
    close = get_close_matches(name, list(known), n=1, cutoff=0.7)
    return f"; did you mean '{close[0]}'?" if close else ""


class GraphflowError(Exception):
    """Base class of every error graphflow raises on purpose."""


class ValidationError(GraphflowError):
    """A document, builder call or parameter set has one or more problems; all are listed."""

    def __init__(self, errors: list[GraphError]) -> None:
        self.errors = list(errors)
        count = len(self.errors)
        lines = "\n".join(f"  {error}" for error in self.errors)
        super().__init__(f"{count} problem{'s' if count != 1 else ''}:\n{lines}")

    @property
    def codes(self) -> list[str]:
        return [str(error.code) for error in self.errors]


class NodeExecutionError(GraphflowError):
    """A node raised while running; results computed before it stay cached."""

    def __init__(self, node: str, node_type: str, cause: BaseException) -> None:
        self.node = node
        self.node_type = node_type
        self.cause = cause
        super().__init__(f"node '{node}' ({node_type}) failed: {type(cause).__name__}: {cause}")


class NodeInputError(GraphflowError):
    """Raised by a node's run when its input values are unusable (e.g. image sizes differ)."""


class Cancelled(GraphflowError):
    """The run was cancelled; finished nodes stay cached and no partial file is written."""
