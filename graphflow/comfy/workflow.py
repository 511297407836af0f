"""ComfyUI's UI-format workflows (`nodes` / `links`, what its editor saves) and PNG metadata, as API prompts.

The UI format lists each node's widget values by position (`widgets_values`) and its links in a table
`[link_id, from_node, from_slot, to_node, to_slot, type]`. The widget values are matched to the class's
widget inputs in declaration order, skipping the extra value a seed's "control after generate" widget adds.
Frontend-only nodes are resolved away: Reroute passes its link on, PrimitiveNode gives its value to the
inputs it feeds, notes are dropped, muted nodes (mode 2) are left out and bypassed ones (mode 4) pass their
first input of each output's type through.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from graphflow.comfy.classes import COMFY_CLASSES
from graphflow.errors import Code, GraphError, ValidationError

_NOTES = frozenset({"Note", "MarkdownNote"})
_MUTED, _BYPASSED = 2, 4


def is_ui_workflow(data: dict[str, Any]) -> bool:
    """Whether `data` is a UI-format workflow rather than an API-format prompt."""
    return isinstance(data.get("nodes"), list) and "links" in data


def read_png_workflow(path: Path) -> dict[str, Any]:
    """The workflow a ComfyUI PNG carries: its `prompt` text chunk (API format), else its `workflow` chunk."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            texts = {key: value for key, value in image.info.items() if isinstance(value, str)}
            if "prompt" not in texts and "workflow" not in texts and hasattr(image, "text"):
                texts |= image.text  # chunks after the pixels: Pillow reads them only by decoding the image
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as error:
        raise ValidationError([GraphError(Code.FILE_NOT_FOUND, f"cannot read {path} as a PNG: {error}",
                                          expected="a PNG ComfyUI saved", found=str(path))]) from None
    for key in ("prompt", "workflow"):
        text = texts.get(key)
        if isinstance(text, str):
            try:
                data = json.loads(text)
            except json.JSONDecodeError as error:
                raise ValidationError([GraphError(Code.INVALID_JSON, f"the PNG's {key} chunk is not JSON: {error}",
                                                  expected="ComfyUI workflow JSON", found=text[:80])]) from None
            if isinstance(data, dict):
                return data
    raise ValidationError([GraphError(Code.INVALID_DOCUMENT, f"{path} carries no ComfyUI workflow",
                                      expected="a 'prompt' or 'workflow' PNG text chunk",
                                      found=", ".join(sorted(texts)) or "no text chunks")])


def prompt_from_ui(workflow: dict[str, Any]) -> dict[str, Any]:
    """The API-format prompt of a UI-format workflow; raises ValidationError listing every problem."""
    errors: list[GraphError] = []
    nodes = {str(node.get("id")): node for node in workflow.get("nodes", []) if isinstance(node, dict)}
    links = _links(workflow.get("links") or [], errors)
    prompt: dict[str, Any] = {}
    for node_id, node in nodes.items():
        kind = node.get("type")
        if kind in _NOTES or kind in ("Reroute", "PrimitiveNode") or node.get("mode") == _MUTED:
            continue
        if node.get("mode") == _BYPASSED:
            continue
        inputs = _widget_inputs(node_id, node, errors)
        for item in node.get("inputs") or []:
            if not isinstance(item, dict) or item.get("link") is None:
                continue
            found = _source(links, nodes, item["link"], item.get("type"), set())
            if found is None:
                continue  # a link from a muted node or a dangling one: the input stays unset
            if isinstance(found, tuple):
                inputs[item.get("name")] = [found[0], found[1]]
            else:
                inputs[item.get("name")] = found["value"]
        prompt[node_id] = {"class_type": kind, "inputs": inputs}
    if errors:
        raise ValidationError(errors)
    return prompt


def _links(table: list[Any], errors: list[GraphError]) -> dict[int, tuple[str, int, str]]:
    """link id -> (source node id, source slot, type)."""
    links: dict[int, tuple[str, int, str]] = {}
    for entry in table:
        if isinstance(entry, list) and len(entry) >= 5:
            links[entry[0]] = (str(entry[1]), int(entry[2]), str(entry[5]) if len(entry) > 5 else "")
        elif isinstance(entry, dict) and "id" in entry:  # the newer frontend's object form
            links[entry["id"]] = (str(entry.get("origin_id")), int(entry.get("origin_slot", 0)),
                                  str(entry.get("type", "")))
        else:
            errors.append(GraphError(Code.BAD_LINK, "a UI workflow link is [id, from_node, from_slot, to_node, "
                                     "to_slot, type]", expected="a link row", found=json.dumps(entry)[:80]))
    return links


def _source(links: dict[int, tuple[str, int, str]], nodes: dict[str, Any], link_id: int, type: Any,
            seen: set[int]) -> tuple[str, int] | dict[str, Any] | None:
    """Where a link really comes from: (node id, slot) of an executed node, {"value": v} of a PrimitiveNode, or
    None for a muted node or a dangling link."""
    if link_id not in links or link_id in seen:
        return None
    seen.add(link_id)
    source_id, slot, link_type = links[link_id]
    source = nodes.get(source_id)
    if source is None or source.get("mode") == _MUTED:
        return None
    kind = source.get("type")
    if kind == "PrimitiveNode":
        values = source.get("widgets_values") or []
        return {"value": values[0]} if values else None
    if kind == "Reroute" or source.get("mode") == _BYPASSED:
        wanted = link_type or type
        for item in source.get("inputs") or []:
            if isinstance(item, dict) and item.get("link") is not None and \
                    (kind == "Reroute" or item.get("type") == wanted):
                return _source(links, nodes, item["link"], wanted, seen)
        return None
    return source_id, slot


def _widget_inputs(node_id: str, node: dict[str, Any], errors: list[GraphError]) -> dict[str, Any]:
    """A node's widget values by input name, matched to its class's widgets in order."""
    spec = COMFY_CLASSES.get(str(node.get("type")))
    values = node.get("widgets_values")
    if spec is None or values is None:
        return {}  # an unknown class is reported by the importer, with every other
    if isinstance(values, dict):  # some nodes save their widgets by name
        return {item.name: values[item.name] for item in spec.widgets if item.name in values}
    inputs: dict[str, Any] = {}
    position = 0
    for item in spec.widgets:
        if position >= len(values):
            break
        inputs[item.name] = values[position]
        position += 1
        if item.control_after_generate and position < len(values) and \
                values[position] in ("fixed", "increment", "decrement", "randomize"):
            position += 1
    if len(values) < len(spec.widgets):
        missing = [item.name for item in spec.widgets[len(values):]]
        errors.append(GraphError(Code.MISSING_REQUIRED_INPUT, f"{spec.name} saved {len(values)} widget values, "
                                 f"fewer than its widgets ({', '.join(missing)} left out)", node_id,
                                 expected=f"{len(spec.widgets)} values", found=json.dumps(values)[:80]))
    return inputs
