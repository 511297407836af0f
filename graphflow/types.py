"""The value types that flow along edges, and which edges are legal.

Types are plain strings so that documents, schemas and error messages show them as users
write them. INT widens to FLOAT; nothing else converts implicitly.
"""

from __future__ import annotations

import math
import reprlib
from typing import Any

IMAGE = "IMAGE"  # float32 tensor [B, H, W, 3], 0..1
MASK = "MASK"  # float32 tensor [B, H, W], 1 = repaint / selected
LATENT = "LATENT"
CONDITIONING = "CONDITIONING"
CONTROL = "CONTROL"
MODEL = "MODEL"
CLIP = "CLIP"
VAE = "VAE"
CONTROLNET = "CONTROLNET"
PATHS = "PATHS"  # list of files an output node wrote
INT = "INT"
FLOAT = "FLOAT"
BOOL = "BOOL"
STRING = "STRING"

SCALAR_TYPES = frozenset({INT, FLOAT, BOOL, STRING})
ALL_TYPES = frozenset(
    {IMAGE, MASK, LATENT, CONDITIONING, CONTROL, MODEL, CLIP, VAE, CONTROLNET, PATHS} | SCALAR_TYPES
)

_JSON_NAMES = {int: "integer", float: "number", bool: "boolean", str: "string", list: "list", dict: "object"}


def is_compatible(source: str, target: str) -> bool:
    """Whether a value of type `source` may feed an input of type `target`."""
    return source == target or (source == INT and target == FLOAT)


_PYTHON_TYPES: dict[str, tuple[type, ...]] = {INT: (int,), FLOAT: (int, float), BOOL: (bool,), STRING: (str,)}


def literal_matches(type_name: str, value: Any) -> bool:
    """Whether a JSON literal is a value of the scalar type (exact types, so a bool is not an INT)."""
    return type(value) in _PYTHON_TYPES.get(type_name, ())


def representable(value: Any) -> bool:
    """Whether a number fits the engine: floats finite, integers within 64 bits (seeds go up to 2**64 - 1)."""
    if type(value) is float:
        return math.isfinite(value)
    if type(value) is int:
        return -(2**63) <= value < 2**64
    return True


def describe_literal(value: Any) -> str:
    """A short description of a literal for error messages: its JSON type and value."""
    kind = "null" if value is None else _JSON_NAMES.get(type(value), type(value).__name__)
    return f"{kind} {show_value(value)}"


_CONTAINERS = reprlib.Repr()
_CONTAINERS.maxlevel, _CONTAINERS.maxdict, _CONTAINERS.maxlist, _CONTAINERS.maxtuple = 3, 4, 4, 4
_CONTAINERS.maxset, _CONTAINERS.maxstring, _CONTAINERS.maxother = 4, 40, 40


def show_value(value: Any) -> str:
    """A value's repr, shortened for error messages: safe for integers too long to print, and for containers
    nested without end (only their first levels are shown)."""
    try:
        shown = _CONTAINERS.repr(value) if isinstance(value, (dict, list, tuple, set, frozenset)) else repr(value)
    except ValueError:  # an integer beyond Python's digit limit for str()
        shown = f"<{value.bit_length()}-bit number>" if isinstance(value, int) else f"<{type(value).__name__}>"
    except Exception:  # a value whose own repr fails
        shown = f"<{type(value).__name__}>"
    return shown if len(shown) <= 60 else shown[:57] + "..."


def parse_text(type_name: str, text: str) -> Any:
    """Parse a command-line string into a scalar of `type_name`; ValueError if it is not one."""
    if type_name == INT:
        return int(text)
    if type_name == FLOAT:
        return float(text)
    if type_name == BOOL:
        lowered = text.strip().lower()
        if lowered in {"true", "1", "yes", "on"}:
            return True
        if lowered in {"false", "0", "no", "off"}:
            return False
        raise ValueError(f"{text!r} is not a boolean (use true or false)")
    if type_name == STRING:
        return text
    raise ValueError(f"{type_name} values cannot be given on the command line")
