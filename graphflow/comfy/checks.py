"""Checks of a ComfyUI API-format prompt before it is translated: shapes, classes, links, widget values, cycles.

Every problem is collected and raised together (unknown classes first, in one error naming them all), so a
workflow is fixed in one pass. What passes is handed on in an order where each link's source comes first.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from graphflow.comfy.classes import COMFY_CLASSES, ComfyClass, ComfyInput
from graphflow.errors import Code, GraphError, ValidationError, did_you_mean


def checked_order(prompt: Mapping[str, Any]) -> list[str]:
    """The prompt's node ids, each after the nodes it links from; raises ValidationError listing every problem."""
    return PromptCheck(prompt).order()


class PromptCheck:
    """The checks of one prompt, in the order they can run: shapes and classes, then inputs, then the order."""

    def __init__(self, prompt: Mapping[str, Any]) -> None:
        self.prompt = prompt

    def order(self) -> list[str]:
        """The node ids in an order where every link's source comes first, after every shape, class, link and
        widget problem was found (and raised together)."""
        errors: list[GraphError] = []
        unknown: list[GraphError] = []
        for comfy_id in node_ids(self.prompt):
            entry = self.prompt[comfy_id]
            if not isinstance(entry, dict) or not isinstance(entry.get("class_type"), str) \
                    or not isinstance(entry.get("inputs", {}), dict):
                errors.append(GraphError(Code.INVALID_DOCUMENT, "a ComfyUI node is an object with a class_type and "
                                         "inputs", comfy_id, expected='{"class_type": ..., "inputs": {...}}',
                                         found=shown(entry)))
            elif entry["class_type"] not in COMFY_CLASSES:
                unknown.append(GraphError(Code.UNKNOWN_NODE_TYPE, f"ComfyUI class {entry['class_type']} has no "
                                          f"graphflow mapping{did_you_mean(entry['class_type'], COMFY_CLASSES)}",
                                          comfy_id, expected="a class graphflow maps", found=entry["class_type"]))
        if unknown:
            names = sorted({str(error.found) for error in unknown})
            errors.insert(0, GraphError(Code.UNKNOWN_NODE_TYPE, f"{len(names)} ComfyUI class"
                                        f"{'es' if len(names) != 1 else ''} cannot be imported: {', '.join(names)}",
                                        expected="classes graphflow maps: " + ", ".join(sorted(COMFY_CLASSES)),
                                        found=", ".join(names)))
            errors.extend(unknown)
        if errors:
            raise ValidationError(errors)
        for comfy_id in node_ids(self.prompt):
            errors.extend(self.input_errors(comfy_id))
        if errors:
            raise ValidationError(errors)
        return self.topological()

    def input_errors(self, comfy_id: str) -> list[GraphError]:
        entry = self.prompt[comfy_id]
        spec = COMFY_CLASSES[entry["class_type"]]
        inputs = entry.get("inputs") or {}
        errors: list[GraphError] = []
        for item in spec.inputs:
            value = inputs.get(item.name)
            if item.is_widget and isinstance(value, list):
                errors.extend(self.link_errors(comfy_id, spec, item, value) or
                              self.primitive_errors(comfy_id, spec, item, value))
            elif item.is_widget:
                problem = widget_problem(item, value)
                if problem is not None:
                    errors.append(GraphError(Code.INVALID_VALUE, f"{spec.name} input {item.name} {problem[0]}",
                                             comfy_id, item.name, problem[1], shown(value)))
            elif value is None:
                if not item.optional:
                    errors.append(GraphError(Code.MISSING_REQUIRED_INPUT, f"{spec.name} needs a {item.type} linked "
                                             f"into {item.name}", comfy_id, item.name, f"a link from a {item.type} "
                                             "output", "nothing"))
            else:
                errors.extend(self.link_errors(comfy_id, spec, item, value))
        return errors

    def link_errors(self, comfy_id: str, spec: ComfyClass, item: ComfyInput, value: Any) -> list[GraphError]:
        where = f"{spec.name} input {item.name}"
        if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], (str, int))
                and isinstance(value[1], int) and not isinstance(value[1], bool)):
            return [GraphError(Code.BAD_LINK, f"{where} takes a link [node_id, output_index]", comfy_id, item.name,
                               f"a link from a {item.type} output", shown(value))]
        source_id, index = str(value[0]), value[1]
        source = self.prompt.get(source_id)
        if source is None:
            return [GraphError(Code.BAD_LINK, f"{where} links to node {source_id}, which is not in the workflow"
                               f"{did_you_mean(source_id, self.prompt)}", comfy_id, item.name,
                               "the id of a node in the workflow", source_id)]
        outputs = COMFY_CLASSES[source["class_type"]].outputs
        if not 0 <= index < len(outputs):
            return [GraphError(Code.BAD_LINK, f"{where} links to output {index} of node {source_id} "
                               f"({source['class_type']}), which has {len(outputs)} output(s)", comfy_id, item.name,
                               f"an index below {len(outputs)}", str(index))]
        if outputs[index] != item.type and (outputs[index], item.type) not in _WIDENED:
            return [GraphError(Code.TYPE_MISMATCH, f"{where} takes {item.type}, but output {index} of node "
                               f"{source_id} ({source['class_type']}) is {outputs[index]}", comfy_id, item.name,
                               item.type, outputs[index])]
        return []

    def primitive_errors(self, comfy_id: str, spec: ComfyClass, item: ComfyInput, value: list[Any]) -> list[GraphError]:
        """A widget linked to a constant node (of the mapped classes, only Primitive nodes output INT, FLOAT,
        STRING or BOOLEAN): the constant must be one ComfyUI's widget accepts."""
        source = self.prompt[str(value[0])]
        literal = primitive_value(source)
        problem = widget_problem(item, literal)
        if problem is None:
            return []
        return [GraphError(Code.INVALID_VALUE, f"{spec.name} input {item.name} (from {source['class_type']} "
                           f"{value[0]}) {problem[0]}", comfy_id, item.name, problem[1], shown(literal))]

    def topological(self) -> list[str]:
        """Depth-first, parents before children; a cycle is an error naming its nodes."""
        order: list[str] = []
        state: dict[str, int] = {}  # 1 visiting, 2 done
        for start in node_ids(self.prompt):
            stack: list[tuple[str, list[str]]] = [(start, self.parents(start))]
            if state.get(start) == 2:
                continue
            state[start] = 1
            while stack:
                node, parents = stack[-1]
                if parents:
                    parent = parents.pop()
                    if state.get(parent) == 1:
                        cycle = [entry for entry, _ in stack]
                        raise ValidationError([GraphError(
                            Code.CYCLE, "these ComfyUI nodes depend on each other in a loop: "
                            + " -> ".join([*cycle[cycle.index(parent):], parent]), parent)])
                    if state.get(parent) is None:
                        state[parent] = 1
                        stack.append((parent, self.parents(parent)))
                else:
                    stack.pop()
                    state[node] = 2
                    order.append(node)
        return order

    def parents(self, comfy_id: str) -> list[str]:
        inputs = self.prompt[comfy_id].get("inputs") or {}
        spec = COMFY_CLASSES[self.prompt[comfy_id]["class_type"]]
        return sorted({str(inputs[item.name][0]) for item in spec.inputs
                       if not item.is_widget and inputs.get(item.name) is not None}, key=id_order, reverse=True)


_WIDENED = frozenset({("INT", "FLOAT"), ("STRING", "COMBO")})  # (output, widget) pairs ComfyUI also accepts


def primitive_value(entry: Mapping[str, Any]) -> Any:
    """The constant a Primitive node gives (its ComfyUI default where the prompt leaves it out)."""
    value = (entry.get("inputs") or {}).get("value")
    return COMFY_CLASSES[entry["class_type"]].inputs[0].default if value is None else value


def widget_problem(item: ComfyInput, value: Any) -> tuple[str, str] | None:
    """What is wrong with a widget value, as (problem, expected), or None."""
    if value is None:  # ComfyUI's default, where there is one
        return ("is missing", "a file name") if item.files is not None else None
    if isinstance(value, list):
        return "is linked, but graphflow imports only literal values there", f"a {item.type} value"
    if item.type == "INT" and (isinstance(value, bool) or not isinstance(value, int)):
        return "is not a whole number", "an INT"
    if item.type == "FLOAT" and (isinstance(value, bool) or not isinstance(value, (int, float))):
        return "is not a number", "a FLOAT"
    if item.type == "BOOLEAN" and not isinstance(value, bool):
        return "is not true or false", "a BOOLEAN"
    if item.type == "STRING" and not isinstance(value, str):
        return "is not a text", "a STRING"
    if item.type == "COMBO" and item.choices and value not in item.choices:
        return f"is not one of the choices{did_you_mean(str(value), item.choices)}", \
            "one of " + ", ".join(item.choices)
    if item.type == "COMBO" and item.files is not None and not isinstance(value, str):
        return "is not a file name", "a file name"
    if item.type in ("INT", "FLOAT"):
        low, high = item.options.get("min"), item.options.get("max")
        if (low is not None and value < low) or (high is not None and value > high):
            return "is out of ComfyUI's range", f"{low} to {high}"
    return None


def node_ids(prompt: Mapping[str, Any]) -> list[str]:
    return sorted(prompt, key=id_order)


def id_order(comfy_id: str) -> tuple[Any, ...]:
    """Numeric ids in number order ("2" before "10"), others after them by text."""
    return (0, int(comfy_id), "") if comfy_id.isdigit() else (1, 0, comfy_id)


def shown(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
