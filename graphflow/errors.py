"""Errors users can act on: a code, where it happened, what was expected and what was found.

Also how they read: names from documents printed safely (`printable`) and "did you mean" hints that stay cheap
in documents of thousands of nodes (`did_you_mean`, `NameIndex`).
"""

from __future__ import annotations

import heapq
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Set
from dataclasses import asdict, dataclass
from difflib import SequenceMatcher
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
        """One line for people: names from documents are shown with unprintable characters escaped."""
        node, input, expected, found = (None if part is None else printable(str(part))
                                        for part in (self.node, self.input, self.expected, self.found))
        where = ""
        if node is not None:
            where = f"node '{node}'"
            if input is not None:
                where += f", input '{input}'"
        elif input is not None:
            where = f"'{input}'"
        head = f"[{self.code}] {where}: " if where else f"[{self.code}] "
        detail = ""
        if expected is not None or found is not None:
            detail = f" (expected {expected}; found {found})"
        return head + printable(str(self.message)) + detail

    def to_json(self) -> dict[str, Any]:
        return {key: (str(value) if key == "code" else value) for key, value in asdict(self).items()}


SHOWN_CHARACTERS = 400  # of one name or message in a line printed for people; the JSON report keeps them whole


def printable(text: str, limit: int | None = SHOWN_CHARACTERS) -> str:
    """`text` safe to print on one line of any terminal: control and format characters (newlines, NUL, escape
    sequences, right-to-left overrides) and unpaired surrogates escaped as Python writes them, text longer than
    `limit` characters shortened."""
    if limit is not None and len(text) > limit:
        text = f"{text[:limit]}... ({len(text) - limit} more characters)"
    if text.isprintable():
        return text
    return "".join(character if character.isprintable() else ascii(character)[1:-1] for character in text)


EXACT_HINTS = 64  # up to this many known names, each is compared with the unknown one
_CUTOFF = 0.7  # how alike (difflib's ratio) a known name must be to be suggested
LONGEST_HINTED = 200  # characters: longer names are not typos, and comparing them costs quadratic time
_WINDOW = 10  # characters at each end of a name that the index keys on
_CANDIDATES = 6  # names compared per lookup in an index: those sharing the most keys with the unknown one
_COMMON_KEY = 64  # names under one key read per lookup
_KEPT_INDEXES = 16
_indexes: OrderedDict[Any, tuple[Any, NameIndex]] = OrderedDict()
_indexes_lock = threading.Lock()


def did_you_mean(name: str, known: Iterable[str] | NameIndex) -> str:
    """A "; did you mean 'x'?" hint naming the closest known name, or "" when none is close.

    Up to EXACT_HINTS names are compared one by one, as difflib.get_close_matches does. A larger collection is
    searched through a NameIndex built once: a dict or set by identity (validation asks once per bad link in one
    document's node ids; a collection changed in place between lookups needs a fresh NameIndex of its own),
    anything else by its contents.
    """
    if not isinstance(known, (NameIndex, Mapping, Set)):
        known = tuple(known)
    index = known if isinstance(known, NameIndex) else _index_of(known)
    close = index.closest(name) if index is not None else _exact_closest(name, list(known))
    return f"; did you mean '{close}'?" if close else ""


def _exact_closest(name: str, known: Iterable[str]) -> str | None:
    """What get_close_matches(name, known, n=1, cutoff=0.7) returns, skipping names that cannot beat the best so far."""
    if not isinstance(name, str) or len(name) > LONGEST_HINTED:
        return None
    matcher = SequenceMatcher()
    matcher.set_seq2(name)
    best: tuple[float, str] | None = None
    for candidate in known:
        if not isinstance(candidate, str):
            continue
        floor = best[0] if best is not None else _CUTOFF
        matcher.set_seq1(candidate)
        if matcher.real_quick_ratio() >= floor and matcher.quick_ratio() >= floor:
            scored = (matcher.ratio(), candidate)
            if scored[0] >= _CUTOFF and (best is None or scored > best):  # ties go to the greater name, as there
                best = scored
    return best[1] if best is not None else None


class NameIndex:
    """Close-name lookups in one large, fixed collection of names at a bounded cost per lookup.

    Names one typo apart (a character left out, added, changed or two swapped) share a key: one end of the name,
    its first or last _WINDOW characters, with at most one of them left out. A lookup compares the unknown name,
    as get_close_matches would, with the _CANDIDATES names that share the most keys with it.
    """

    def __init__(self, names: Iterable[str]) -> None:
        self._by_key: dict[str, list[str]] = {}
        for name in dict.fromkeys(names):
            if isinstance(name, str) and len(name) <= LONGEST_HINTED:
                for key in _keys(name):
                    self._by_key.setdefault(key, []).append(name)
        self._found: dict[str, str | None] = {}

    def closest(self, name: str) -> str | None:
        """The closest name in the collection, or None when none is close."""
        try:
            return self._found[name]
        except KeyError:  # not looked up yet
            pass
        if len(self._found) >= 10_000:  # bounded: an index may serve a long-lived process
            self._found.clear()
        found = self._found[name] = self._closest(name)
        return found

    def _closest(self, name: str) -> str | None:
        if not isinstance(name, str) or len(name) > LONGEST_HINTED:
            return None
        shared: dict[str, int] = {}  # name -> how many of the unknown name's keys it has
        for bucket in sorted((self._by_key.get(key, ()) for key in _keys(name)), key=len):
            if len(bucket) > _COMMON_KEY and shared:
                break  # keys this common tell nothing more
            for other in bucket[:_COMMON_KEY]:
                shared[other] = shared.get(other, 0) + 1
        return _exact_closest(name, heapq.nlargest(_CANDIDATES, shared, key=shared.__getitem__))


def _keys(name: str) -> set[str]:
    keys: set[str] = set()
    for end in {name[:_WINDOW], name[-_WINDOW:]}:
        keys.update(end[:skip] + end[skip + 1:] for skip in range(len(end) + 1))
    return keys


def _index_of(known: Mapping[str, Any] | Set[str] | tuple[str, ...]) -> NameIndex | None:
    """The kept index of a large collection (built on first use), or None for a small one."""
    if len(known) <= EXACT_HINTS:
        return None
    # a dict or set by identity: hashing 10,000 names per lookup is the cost being avoided
    key = ("names", known) if isinstance(known, tuple) else ("id", id(known), len(known))
    with _indexes_lock:
        kept = _indexes.get(key)
        if kept is not None:  # an id in a key is never reused: the entry holds its object
            _indexes.move_to_end(key)
            return kept[1]
    index = NameIndex(known)
    with _indexes_lock:
        _indexes[key] = (known, index)  # holding `known` keeps its id from being reused while it is kept
        while len(_indexes) > _KEPT_INDEXES:
            _indexes.popitem(last=False)
    return index


class GraphflowError(Exception):
    """Base class of every error graphflow raises on purpose."""


class ValidationError(GraphflowError):
    """A document, builder call or parameter set has one or more problems; all are listed."""

    def __init__(self, errors: list[GraphError]) -> None:
        self.errors = list(errors)
        count = len(self.errors)
        lines = "\n".join(f"  {error}" for error in self.errors)
        super().__init__(f"{count} problem{'s' if count != 1 else ''}:\n{lines}")

    def __reduce__(self) -> tuple[Any, ...]:  # pickled whole (a Ray actor or another process sends it back)
        return (type(self), (self.errors,), self.__dict__)

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

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.node, self.node_type, self.cause), self.__dict__)


class NodeInputError(GraphflowError):
    """Raised by a node's run when its input values are unusable (e.g. image sizes differ)."""


class Cancelled(GraphflowError):
    """The run was cancelled; finished nodes stay cached and no partial file is written."""
