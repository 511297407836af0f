"""How a node type is declared: typed inputs and outputs, a version, and a pure `run`.

One declaration drives validation, the JSON Schema, `graphflow nodes`, the Python builder and
the cache key. A node class is also the builder's call: `Canny(image=photo.image, low=50)`
checks its arguments at once and returns one use of the node, ready for `Graph.add`.
"""

from __future__ import annotations

import inspect
import keyword
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from graphflow import types
from graphflow.document import NAME_PATTERN
from graphflow.errors import Code, GraphError, ValidationError, did_you_mean

if TYPE_CHECKING:
    from graphflow.context import RunContext


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class Input:
    """One input of a node type.

    `optional` inputs may stay unconnected (the node receives None); `list` inputs take a list
    of values or links that fan in; `file` marks a STRING path read from the input root, whose
    bytes (not name) go into the cache key; `model` marks a STRING model source (hub id, folder,
    file) whose fingerprint (file sizes and times, or the cached hub revision) joins the key, so
    replaced weights re-run the node; `output_path` marks a STRING path the node writes under the
    output root, checked before anything runs.
    """

    name: str
    type: str
    description: str = ""
    default: Any = REQUIRED
    min: float | None = None
    max: float | None = None
    choices: tuple[Any, ...] | None = None
    optional: bool = False
    list: bool = False
    file: bool = False
    model: bool = False
    output_path: bool = False
    # worked out once here: validation asks for them of every value it checks
    required: bool = field(init=False, repr=False, compare=False)
    accepts_literal: bool = field(init=False, repr=False, compare=False)  # a scalar type, so literals are values
    # (type, value) of literals already found acceptable: documents repeat values (steps, op, scheduler) by the
    # hundred, and a value valid once is valid for good (the checks depend on nothing else)
    _accepted: dict[tuple[type, Any], bool] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "required", self.default is REQUIRED and not self.optional)
        object.__setattr__(self, "accepts_literal", self.type in types.SCALAR_TYPES)
        object.__setattr__(self, "_accepted", {})

    def check_literal(self, value: Any, node: str | None) -> list[GraphError]:
        """Errors for a literal given to this input (empty when the value is acceptable)."""
        if self.list and isinstance(value, list):
            return [error for item in value for error in self._check_scalar(item, node)]
        kind = type(value)
        if kind in _REMEMBERED and (kind, value) in self._accepted:
            return []
        errors = self._check_scalar(value, node)
        if not errors and kind in _REMEMBERED and len(self._accepted) < _ACCEPTED_KEPT:
            self._accepted[kind, value] = True
        return errors

    def _check_scalar(self, value: Any, node: str | None) -> list[GraphError]:
        if not self.accepts_literal:
            return [GraphError(Code.INVALID_VALUE, f"{self.type} values cannot be written literally; "
                               f"link this input to a node output with {{\"from\": \"node.output\"}}",
                               node, self.name, f"a link to {self.type} output", types.describe_literal(value))]
        if not types.literal_matches(self.type, value):
            expected = self.type + (" or a list of them" if self.list else "")
            return [GraphError(Code.INVALID_VALUE, f"this input takes {expected}",
                               node, self.name, expected, types.describe_literal(value))]
        if self.choices is not None and value not in self.choices:
            options = ", ".join(repr(choice) for choice in self.choices)
            return [GraphError(Code.VALUE_NOT_IN_CHOICES, f"choose one of {options}",
                               node, self.name, f"one of {options}", types.show_value(value))]
        too_low = self.min is not None and value < self.min
        too_high = self.max is not None and value > self.max
        if too_low or too_high or not types.representable(value):
            return [GraphError(Code.VALUE_OUT_OF_RANGE, "the value is outside the allowed range",
                               node, self.name, self.range_text(), types.show_value(value))]
        return []

    def range_text(self) -> str:
        low = "-inf" if self.min is None else repr(self.min)
        high = "inf" if self.max is None else repr(self.max)
        if self.type == types.FLOAT:
            return f"a finite value in [{low}, {high}]"
        return f"a value in [{low}, {high}]" if self.min is not None or self.max is not None else "a 64-bit integer"


@dataclass(frozen=True)
class Output:
    """One named output of a node type."""

    name: str
    type: str
    description: str = ""


@dataclass(frozen=True)
class OutputRef:
    """A typed handle to one output of a node in a graph being built in Python."""

    node: Node
    name: str
    type: str


@dataclass(frozen=True)
class ParamRef:
    """A template parameter used as an input value: `{"param": name}` in documents."""

    name: str
    type: str = field(default="", compare=False)
    list: bool = field(default=False, compare=False)  # a list param: a list of `type` values


_REMEMBERED = frozenset({str, int, float, bool})  # hashable literals, told apart by type (1, 1.0 and True differ)
_ACCEPTED_KEPT = 256  # literals remembered per input
INSTANCE_ATTRIBUTES = frozenset({"values"})  # set on each use of a node in the builder: no output may take the name


class Node:
    """Base class of every node type. Subclasses declare, they do not register themselves.

    A declaration is checked when the class is made: names, types (built-in or registered with
    `graphflow.types.register`), defaults, and that `run` takes exactly the declared inputs.
    """

    type_name: ClassVar[str] = "Node"
    version: ClassVar[str] = "1.0.0"
    category: ClassVar[str] = "utility"
    inputs: ClassVar[tuple[Input, ...]] = ()
    outputs: ClassVar[tuple[Output, ...]] = ()
    is_output: ClassVar[bool] = False
    disk_cache: ClassVar[bool] = False  # keep results across processes when the engine has a disk cache
    uses_options: ClassVar[tuple[str, ...]] = ()  # engine options (device, dtype) the result depends on: keyed
    input_map: ClassVar[dict[str, Input]] = {}
    output_map: ClassVar[dict[str, Output]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "type_name" not in cls.__dict__:
            cls.type_name = cls.__name__
        if not isinstance(cls.type_name, str) or not cls.type_name:
            raise TypeError(f"{cls.__qualname__}: type_name must be a non-empty text, not {cls.type_name!r}")
        problems = _declaration_problems(cls)
        if not problems:
            cls.input_map = {spec.name: spec for spec in cls.inputs}
            cls.output_map = {spec.name: spec for spec in cls.outputs}
            # a base that declares nothing yet (its subclasses do) is checked in them, and when registered
            problems = run_signature_problems(cls) if cls.inputs or cls.outputs else []
        if problems:
            raise TypeError(f"{declared_as(cls)}: " + "; ".join(problems))
        cls.__signature__ = builder_signature(cls.inputs)

    def __init__(self, /, **values: Any) -> None:  # positional-only, so that an input may be named "self"
        errors: list[GraphError] = []
        for name, value in values.items():
            spec = self.input_map.get(name)
            if spec is None:
                errors.append(unknown_input_error(type(self), name, self.type_name))
            else:
                errors.extend(check_builder_value(spec, value, self.type_name))
        if errors:
            raise ValidationError(errors)
        self.values: dict[str, Any] = values  # in the caller's order, which documents keep

    def __getattr__(self, name: str) -> OutputRef:
        spec = type(self).output_map.get(name)
        if spec is None or name.startswith("_"):
            raise AttributeError(f"{self.type_name} has no output {name!r}; outputs: {list(self.output_map)}")
        return OutputRef(self, name, spec.type)

    def __getitem__(self, name: str) -> OutputRef:
        return self.__getattr__(name)

    def run(self, ctx: RunContext, /, **inputs: Any) -> dict[str, Any]:
        """Map input values to a dict of output values. Must not change its inputs."""
        raise NotImplementedError

    def outputs_still_valid(self, outputs: dict[str, Any]) -> bool:
        """Whether a cached result may be reused (output nodes check their files still exist)."""
        return True


def declared_as(cls: type[Node]) -> str:
    """How errors name a node class: its type name and where the class is defined."""
    return f"{cls.type_name} ({cls.__module__}.{cls.__qualname__})"


def _declaration_problems(cls: type[Node]) -> list[str]:
    """What is wrong with a node class's inputs and outputs (empty when nothing is)."""
    if not (isinstance(cls.inputs, tuple | list) and all(isinstance(spec, Input) for spec in cls.inputs)):
        return [f"inputs must be a tuple of Input, not {types.show_value(cls.inputs)}"]
    if not (isinstance(cls.outputs, tuple | list) and all(isinstance(spec, Output) for spec in cls.outputs)):
        return [f"outputs must be a tuple of Output, not {types.show_value(cls.outputs)}"]
    problems: list[str] = []
    names = [spec.name for spec in (*cls.inputs, *cls.outputs)]
    badly_named = [name for name in names if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name)]
    if badly_named:  # documents write them as input keys and in "node.output" links
        problems.append(f"names {badly_named} are not letters, digits, '_' and '-' (starting with a letter, digit "
                        "or '_')")
    input_names, output_names = [spec.name for spec in cls.inputs], [spec.name for spec in cls.outputs]
    if len(set(input_names)) != len(input_names) or len(set(output_names)) != len(output_names):
        problems.append("input and output names must be unique")
    shadowed = [name for name in output_names if isinstance(name, str) and reserved_output_name(cls, name)]
    if shadowed:
        problems.append(f"outputs {shadowed} are named like attributes of the node in the builder "
                        f"(node.{shadowed[0]} must be the output); rename them")
    problems.extend(_type_problems(cls))
    unwritable = [spec.name for spec in cls.inputs if not _literal(spec.default)
                  or (spec.choices is not None and not all(map(_literal, spec.choices)))]
    if unwritable:  # documents, the schema and `graphflow nodes` write them as JSON
        problems.append(f"inputs {unwritable} have defaults or choices that are not JSON values")
    linked_defaults = [spec.name for spec in cls.inputs if not spec.accepts_literal and types.is_known(spec.type)
                       and spec.default is not REQUIRED and spec.default is not None]
    if linked_defaults:
        problems.append(f"inputs {linked_defaults} take values only through links, so their default can only be "
                        "None (declare them optional=True instead)")
    keyed_lists = [spec.name for spec in cls.inputs if spec.list and (spec.file or spec.model)]
    if keyed_lists:  # each file or source is read and keyed on its own: a list of them has no one place to be
        problems.append(f"inputs {keyed_lists} are lists of files or model sources, which graphflow cannot key; "
                        "declare one input per file")
    return problems


def _type_problems(cls: type[Node]) -> list[str]:
    """Inputs and outputs whose type is neither built in nor registered."""
    problems = []
    for kind, specs in (("input", cls.inputs), ("output", cls.outputs)):
        for spec in specs:
            if types.is_known(spec.type):
                continue
            if not isinstance(spec.type, str):
                problems.append(f"{kind} '{spec.name}' has type {types.show_value(spec.type)}, which is not a type "
                                "name (use graphflow.types.IMAGE and the like)")
                continue
            upper = spec.type.upper()
            hint = f"; did you mean {upper!r}?" if types.is_known(upper) else \
                did_you_mean(spec.type, types.known_types())
            problems.append(f"{kind} '{spec.name}' has unknown type {spec.type!r}{hint}; a node pack's own type "
                            f"must be registered before its nodes are declared: "
                            f"graphflow.types.register({spec.type!r}, \"what its values are\")")
    return problems


def reserved_output_name(cls: type[Node], name: str) -> bool:
    """Whether an output of `cls` may not be called `name`: in the builder `node.name` is the output, so it cannot
    be an attribute of the node (a method, a class attribute, one the builder sets, or one Python looks up
    itself, named with a leading '_')."""
    return name.startswith("_") or name in INSTANCE_ATTRIBUTES or hasattr(cls, name) or \
        any(name in inspect.get_annotations(base) for base in cls.__mro__)


def run_signature_problems(cls: type[Node]) -> list[str]:
    """How `cls.run` disagrees with the declared inputs: the engine calls `run(ctx, **inputs)` with every declared
    input, so run must take each by name (or take **inputs) and nothing else (declared once, in `inputs`)."""
    try:
        signature = inspect.signature(cls.run)
    except (TypeError, ValueError):  # a run that inspect cannot read (written in C): nothing to compare
        return []
    parameters = list(signature.parameters.values())
    bound = [] if not inspect.isfunction(inspect.getattr_static(cls, "run")) else parameters[:1]  # self
    parameters = parameters[len(bound):]
    kinds = inspect.Parameter
    if not parameters or parameters[0].kind not in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD,
                                                    kinds.VAR_POSITIONAL):
        return [f"run{signature} must take the run context first: run(self, ctx, ...)"]
    context = [] if parameters[0].kind == kinds.VAR_POSITIONAL else parameters[:1]
    rest = parameters[len(context):]
    problems = []
    taken = [parameter.name for parameter in (*bound, *context) if parameter.kind != kinds.POSITIONAL_ONLY]
    clashing = [name for name in taken if name in cls.input_map]
    if clashing:
        problems.append(f"inputs {clashing} have the names of run's own parameters (self, ctx); rename the "
                        "inputs or those parameters")
    positional = [parameter.name for parameter in rest if parameter.kind == kinds.POSITIONAL_ONLY]
    if positional:
        problems.append(f"run's parameters {positional} are positional-only, but inputs are passed by name")
    named = {parameter.name: parameter for parameter in rest
             if parameter.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)}
    extra = [name for name in named if name not in cls.input_map]
    if extra:
        problems.append(f"run takes parameters {extra} that are not declared inputs "
                        f"(declared: {', '.join(cls.input_map) or 'none'}); declare them or remove them from run")
    if not any(parameter.kind == kinds.VAR_KEYWORD for parameter in rest):
        missing = [name for name in cls.input_map if name not in named and name not in clashing]
        if missing:
            problems.append(f"run does not take the declared inputs {missing}; add them to run's parameters "
                            "(or take **inputs)")
    return problems


def builder_signature(inputs: tuple[Input, ...]) -> inspect.Signature:
    """The builder call's signature, for help() and editors: Canny(*, image: IMAGE, low: INT = 100, ...).

    Inputs whose names cannot be Python keyword arguments (template params "my-param", "class") are left out;
    the call still takes them as `**{"my-param": 3}`.
    """
    return inspect.Signature([
        inspect.Parameter(spec.name, inspect.Parameter.KEYWORD_ONLY, annotation=spec.type,
                          default=inspect.Parameter.empty if spec.required else
                          (None if spec.default is REQUIRED else spec.default))
        for spec in inputs if spec.name.isidentifier() and not keyword.iskeyword(spec.name)])


def _literal(value: Any) -> bool:
    """Whether a declared default or choice can be written in a document: a JSON scalar, or a list of them."""
    if value is REQUIRED or value is None or type(value) in (str, int, float, bool):
        return True
    return type(value) in (list, tuple) and all(item is None or type(item) in (str, int, float, bool) for item in value)


def unknown_input_error(node_type: type[Node], name: str, node: str | None) -> GraphError:
    """The error for an input name the node type does not declare, with the closest names."""
    known = list(node_type.input_map)
    return GraphError(Code.UNKNOWN_INPUT, f"{node_type.type_name} has no input '{name}'{did_you_mean(name, known)}",
                      node, name, f"one of {', '.join(known) or '(no inputs)'}", repr(name))


def missing_input_error(node_type: type[Node], spec: Input, node: str | None) -> GraphError:
    """The error for a required input that was not given."""
    purpose = f" ({spec.description.rstrip('.')})" if spec.description else ""
    return GraphError(Code.MISSING_REQUIRED_INPUT, f"{node_type.type_name} needs input '{spec.name}'{purpose}",
                      node, spec.name, spec.type, "nothing")


def file_link_error(spec: Input, node: str | None, found: str) -> GraphError:
    """File and model inputs are keyed by what they name (a file's bytes, a model's files), which must be known
    when the run is planned: a link from another node's output is not."""
    what = "file inputs" if spec.file else "model sources"
    keyed = "the file's bytes" if spec.file else "the model's files"
    return GraphError(Code.INVALID_VALUE, f"{what} take a literal or a param with a literal value, not a link, so "
                      f"that {keyed} (known before anything runs) go into the cache key", node, spec.name,
                      "a literal path or source, or a param", found)


def check_builder_value(spec: Input, value: Any, node: str | None) -> list[GraphError]:
    """Check one builder argument: a handle's type, a parameter, or a literal."""
    if spec.list and isinstance(value, (list, tuple)):
        item_spec = Input(spec.name, spec.type, min=spec.min, max=spec.max, choices=spec.choices)
        # a list param among the items is spliced in: checked like one at the list input itself
        return [error for item in value for error in check_builder_value(
            spec if isinstance(item, ParamRef) and item.list else item_spec, item, node)]
    if isinstance(value, OutputRef):
        if spec.file or spec.model:
            return [file_link_error(spec, node, f"{value.type} from {value.node.type_name}.{value.name}")]
        if types.is_compatible(value.type, spec.type):
            return []
        return [GraphError(Code.TYPE_MISMATCH, f"cannot connect {value.type} output to {spec.type} input",
                           node, spec.name, spec.type, f"{value.type} from {value.node.type_name}.{value.name}")]
    if isinstance(value, ParamRef):
        if value.list and not spec.list:
            return [GraphError(Code.TYPE_MISMATCH, f"param '{value.name}' is a list of {value.type} but this input "
                               f"takes one {spec.type}", node, spec.name, f"one {spec.type}",
                               f"a list of {value.type} param '{value.name}'")]
        if not value.type or types.is_compatible(value.type, spec.type):
            return []
        return [GraphError(Code.TYPE_MISMATCH, f"param '{value.name}' is {value.type} but this input takes "
                           f"{spec.type}", node, spec.name, spec.type, f"{value.type} param '{value.name}'")]
    return spec.check_literal(value, node)
