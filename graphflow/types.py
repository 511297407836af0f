"""The value types that flow along edges, and which edges are legal.

Types are plain strings so that documents, schemas and error messages show them as users
write them. INT widens to FLOAT; nothing else converts implicitly. Node packs add types of
their own with `register` (a LoRA, a CLIP vision model): those travel only through links,
between inputs and outputs of exactly that type.
"""

from __future__ import annotations

import math
import re
import reprlib
import threading
from dataclasses import dataclass
from typing import Any

from graphflow.errors import GraphflowError

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


@dataclass(frozen=True)
class ValueType:
    """A type that inputs and outputs may declare. Only the built-in scalars have literals."""

    name: str
    description: str = ""
    builtin: bool = False


_BUILTIN = {spec.name: spec for spec in (
    ValueType(IMAGE, "float32 tensor [B, H, W, 3], RGB, values 0..1", True),
    ValueType(MASK, "float32 tensor [B, H, W], 1 = repaint / selected, 0 = keep", True),
    ValueType(LATENT, "latents [B, 4, H/8, W/8] with an optional noise mask and their model family", True),
    ValueType(CONDITIONING, "prompt embeddings (pooled too for SDXL) with their model family", True),
    ValueType(CONTROL, "one ControlNet application: controlnet, image, scale, start, end", True),
    ValueType(MODEL, "a denoiser (UNet) held by the model manager, with its patches", True),
    ValueType(CLIP, "text encoders and tokenizers held by the model manager", True),
    ValueType(VAE, "an autoencoder held by the model manager", True),
    ValueType(CONTROLNET, "a ControlNet held by the model manager", True),
    ValueType(PATHS, "the files an output node wrote", True),
    ValueType(INT, "a 64-bit integer", True),
    ValueType(FLOAT, "a finite number", True),
    ValueType(BOOL, "true or false", True),
    ValueType(STRING, "text", True),
)}
BUILTIN_TYPES = frozenset(_BUILTIN)
TYPE_NAME = re.compile(r"[A-Z][A-Z0-9_]{0,63}")  # like the built-in names; always fullmatch
# name -> declaration. Replaced whole under the lock, never changed in place: readers (validation, every node
# class being declared) take it without locking and see one consistent table.
_types: dict[str, ValueType] = dict(_BUILTIN)
_registering = threading.Lock()


class TypeRegistrationError(GraphflowError, ValueError):
    """A value type cannot be registered: a bad name, or a name already registered differently."""


def register(name: str, description: str = "") -> str:
    """Declare a value type for node packs' inputs and outputs, and return its name.

    Call it at import time, before declaring the nodes that use it: `LORA = types.register("LORA", "a LoRA
    patch")`. Values of the type are never written literally; they flow through links between inputs and
    outputs of exactly this type, and their nodes' cache keys follow the keys upstream. Registering a name
    again with the same description is harmless (two packs may share a type); with another, it is an error.
    """
    if type(name) is not str or not TYPE_NAME.fullmatch(name):
        raise TypeRegistrationError(f"type name {show_value(name)} must be upper case letters, digits and '_', "
                                    "starting with a letter, at most 64 characters, like IMAGE or CLIP_VISION")
    if type(description) is not str:
        raise TypeRegistrationError(f"the description of type {name} must be text, not {show_value(description)}")
    wanted = ValueType(name, description)
    global _types
    with _registering:
        existing = _types.get(name)
        if existing is None:
            _types = {**_types, name: wanted}
        elif existing.builtin:
            raise TypeRegistrationError(f"{name} is a built-in type ({existing.description}); "
                                        "choose another name for a type of your own")
        elif existing != wanted:
            raise TypeRegistrationError(f"type {name} is already registered as {existing.description!r}, not "
                                        f"{description!r}; one of the node packs must rename its type")
    return name


def is_known(name: object) -> bool:
    """Whether `name` is a built-in or registered type."""
    return isinstance(name, str) and name in _types


def known_types() -> dict[str, ValueType]:
    """Every type by name, built-in and registered, in name order."""
    table = _types
    return {name: table[name] for name in sorted(table)}


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
