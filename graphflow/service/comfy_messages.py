"""A job's graphflow events told as the websocket messages ComfyUI sends for a prompt, and a finished job as the
entry GET /history/{prompt_id} answers.

ComfyUI's order, kept here: `execution_start`, `execution_cached {nodes}`, then per node `executing {node}`,
`progress {value, max, node}` for sampler steps and `executed {node, output}` for output nodes, and at the end
`execution_success`, `execution_error` or `execution_interrupted`, always followed by `executing {node: null}`
(what ComfyUI's own example script waits for). Node ids are the prompt's; graphflow nodes the import added
without a ComfyUI node behind them are left out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import PurePosixPath
from typing import Any

from graphflow.service.comfy_prompts import ComfyPrompt, graph_output
from graphflow.service.queue import COMPLETED, Event, Job

Message = tuple[str, dict[str, Any]]
NodeOutputs = dict[str, dict[str, list[dict[str, str]]]]  # ComfyUI node id -> {"images": [{filename, ...}]}
# the messages ComfyUI keeps in a history entry's status
_STATUS_MESSAGES = ("execution_start", "execution_cached", "execution_success", "execution_error",
                    "execution_interrupted")


def image_ref(path: str, folder_type: str) -> dict[str, str]:
    """A file as ComfyUI names it to GET /view: its name, the folder it is in, and which root (output, temp)."""
    posix = PurePosixPath(path)
    parent = str(posix.parent)
    return {"filename": posix.name, "subfolder": "" if parent == "." else parent, "type": folder_type}


def summary_outputs(prompt: ComfyPrompt, summary: dict[str, Any] | None,
                    relative: Callable[[str], str | None]) -> NodeOutputs:
    """Each output node's images from a job's summary: files an output node wrote (a PATHS result, served from
    the output folder; `relative` gives a path's place in it) or images kept in the results (served as temp)."""
    found: NodeOutputs = {}
    results = (summary or {}).get("outputs", {})
    for comfy_id in prompt.outputs:
        result = results.get(graph_output(comfy_id))
        if not isinstance(result, dict):
            continue
        if result.get("type") == "PATHS":
            places = [relative(str(path)) for path in result.get("value") or []]
            images = [image_ref(place, "output") for place in places if place is not None]
        else:
            images = [image_ref(name, "temp") for name in result.get("files", [])]
        if images:
            found[comfy_id] = {"images": images}
    return found


class PromptMessages:
    """Turns one job's events, fed in order, into ComfyUI's messages for its prompt. `finished_outputs` is asked,
    once the job completes, for the output nodes' images (those of cached nodes, or of nodes that wrote no file,
    are known only then)."""

    def __init__(self, prompt: ComfyPrompt, finished_outputs: Callable[[], NodeOutputs]) -> None:
        self.prompt = prompt
        self.prompt_id = prompt.job_id
        self._finished_outputs = finished_outputs
        self._cached: list[str] | None = None  # collected from run_started until the first node starts
        self._current: str | None = None
        self._executed: list[str] = []
        self._sent: set[str] = set()  # output nodes whose `executed` went out
        self._files: dict[str, list[dict[str, str]]] = {}
        self._failed: str | None = None

    def feed(self, event: Event) -> list[Message]:
        """The messages this event makes (often none)."""
        stamp = {"prompt_id": self.prompt_id, "timestamp": int(event.time * 1000)}
        comfy_id = self.prompt.comfy_node(str(event.data.get("node", "")))
        kind = event.kind
        if kind == "job_started":
            return [("execution_start", stamp)]
        if kind == "run_started":
            self._cached = []
        elif kind == "node_cached" and comfy_id is not None:
            # the engine never reaches what only a cached node reads: to ComfyUI, that is cached too
            for cached in self._with_upstream(comfy_id):
                self._done(cached)
                if self._cached is not None and cached not in self._cached:
                    self._cached.append(cached)
        elif kind in ("node_started", "node_progress") and comfy_id is not None:
            messages = [*self._flush_cached(stamp), *self._executing(comfy_id)]
            if kind == "node_progress":
                messages.append(("progress", {"value": event.data["step"], "max": event.data["total"],
                                              "prompt_id": self.prompt_id, "node": comfy_id}))
            return messages
        elif kind == "file_written":
            self._files.setdefault(event.data["node"], []).append(
                image_ref(event.data.get("path") or event.data["name"], "output"))
        elif kind == "node_finished" and comfy_id is not None:
            self._done(comfy_id)
            return self._executed_message(self.prompt.output_node(event.data["node"]),
                                          self._files.get(event.data["node"], []))
        elif kind == "node_failed":
            self._failed = event.data.get("node")
        elif kind in ("job_completed", "job_failed", "job_cancelled"):
            return self._end(kind, event.data, stamp)
        return []

    def _with_upstream(self, comfy_id: str) -> list[str]:
        """A prompt node and every node it reads, directly or not (links are [node id, output index])."""
        found, stack = [], [comfy_id]
        while stack:
            current = stack.pop()
            if current in found or current not in self.prompt.prompt:
                continue
            found.append(current)
            inputs = self.prompt.prompt[current].get("inputs") or {}
            stack.extend(str(value[0]) for value in inputs.values() if isinstance(value, list) and value)
        return found

    def _done(self, comfy_id: str) -> None:
        if comfy_id not in self._executed:
            self._executed.append(comfy_id)

    def _flush_cached(self, stamp: dict[str, Any]) -> list[Message]:
        if self._cached is None:
            return []
        cached, self._cached = self._cached, None
        return [("execution_cached", {"nodes": cached, **stamp})]

    def _executing(self, comfy_id: str | None) -> list[Message]:
        if comfy_id is not None and comfy_id == self._current:
            return []
        self._current = comfy_id
        return [("executing", {"node": comfy_id, "display_node": comfy_id, "prompt_id": self.prompt_id})]

    def _executed_message(self, comfy_id: str | None, images: list[dict[str, str]]) -> list[Message]:
        if comfy_id is None or not images or comfy_id in self._sent:
            return []
        self._sent.add(comfy_id)
        return [("executed", {"node": comfy_id, "display_node": comfy_id, "output": {"images": images},
                              "prompt_id": self.prompt_id})]

    def _end(self, kind: str, data: dict[str, Any], stamp: dict[str, Any]) -> list[Message]:
        if kind == "job_cancelled" and data.get("while") == "pending":
            return []  # ComfyUI says nothing of a prompt deleted from the queue before it ran
        messages = self._flush_cached(stamp)
        if kind == "job_completed":
            for comfy_id, output in self._finished_outputs().items():
                messages += self._executed_message(comfy_id, output["images"])
            messages.append(("execution_success", stamp))
        else:
            error = data.get("error") or {}
            failed = self.prompt.comfy_node(self._failed or str(error.get("node", ""))) or self._current
            where = {"prompt_id": self.prompt_id, "node_id": failed, "node_type": self.prompt.class_type(failed),
                     "executed": list(self._executed)}
            if kind == "job_cancelled":
                messages.append(("execution_interrupted", {**where, "timestamp": stamp["timestamp"]}))
            else:
                messages.append(("execution_error", {
                    **where, "exception_message": error.get("message", "the job failed"),
                    "exception_type": "graphflow.errors.NodeExecutionError" if failed else "graphflow.errors."
                                      "GraphflowError",
                    "traceback": [], "current_inputs": {}, "current_outputs": {}, "timestamp": stamp["timestamp"]}))
        self._current = None
        return [*messages, ("executing", {"node": None, "display_node": None, "prompt_id": self.prompt_id})]


def history_entry(prompt: ComfyPrompt, job: Job, events: Iterable[Event], outputs: NodeOutputs) -> dict[str, Any]:
    """A finished job as one value of GET /history: the prompt as queued, its output nodes' images, its status
    (success or error, with ComfyUI's status messages) and each output node's meta."""
    translator = PromptMessages(prompt, lambda: outputs)
    messages = [[kind, data] for event in events for kind, data in translator.feed(event) if kind in _STATUS_MESSAGES]
    extra = {"client_id": prompt.client_id} if prompt.client_id is not None else {}
    return {"prompt": [prompt.number, prompt.job_id, prompt.prompt, extra, list(prompt.outputs)],
            "outputs": outputs,
            "status": {"status_str": "success" if job.status == COMPLETED else "error",
                       "completed": job.status == COMPLETED, "messages": messages},
            "meta": {comfy_id: {"node_id": comfy_id, "display_node": comfy_id, "parent_node": None,
                                "real_node_id": comfy_id} for comfy_id in outputs}}
