"""ComfyUI's HTTP and websocket API on `graphflow serve`, so a client script written for ComfyUI runs unchanged:
`POST /prompt` (an API-format prompt, imported by graphflow.comfy and queued as a job), `GET /prompt`,
`POST /interrupt`, `GET /history[/{prompt_id}]`, `GET /view`, `GET /object_info[/{class}]` and the `/ws`
websocket. The same routes
answer under /api too, as ComfyUI's do.

The service's guards hold here as everywhere: the bearer token (a ComfyUI script sends it as an Authorization
header, or the server runs with --no-auth on a loopback address), the body limit, and, because a browser lets any
page post a form or open a websocket to 127.0.0.1, a request whose Origin is neither the server itself nor a
--cors-origin is refused.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import APIRouter, HTTPException, Query, Request, WebSocket
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse
from starlette.datastructures import Headers

from graphflow.comfy.classes import COMFY_CLASSES, comfy_class_info
from graphflow.errors import Code, GraphError, ValidationError
from graphflow.service.comfy_messages import NodeOutputs, PromptMessages, history_entry, summary_outputs
from graphflow.service.comfy_prompts import ComfyPrompt, ComfyPrompts, graph_output
from graphflow.service.queue import FINISHED_STATUSES, PENDING, RUNNING, Event, Job
from graphflow.service.submit import SubmitError, prepare_jobs
from graphflow.service.worker import output_place

_WS_POLL_S = 0.1
_QUEUE_CHANGES = frozenset({"job_queued", "job_completed", "job_failed", "job_cancelled"})


def comfy_routers(service: Any, cors_origins: tuple[str, ...]) -> list[APIRouter]:
    """The ComfyUI routes, at the root and under /api (the /api copies stay out of the OpenAPI document)."""
    api = ComfyApi(service, cors_origins)
    return [api.router(prefix="", in_schema=True), api.router(prefix="/api", in_schema=False)]


class ComfyApi:
    """The routes' shared state: the service and the prompts table."""

    def __init__(self, service: Any, cors_origins: tuple[str, ...]) -> None:
        self.service = service
        self.queue = service.queue
        self.prompts = ComfyPrompts(service.config.database)
        self.outputs_root = Path(service.config.outputs).resolve()
        self.allowed_origins = frozenset(origin.rstrip("/").lower() for origin in cors_origins)

    def router(self, *, prefix: str, in_schema: bool) -> APIRouter:
        router = APIRouter(prefix=prefix, tags=["ComfyUI"], include_in_schema=in_schema)
        router.add_api_route("/prompt", self.post_prompt, methods=["POST"], response_class=JSONResponse)
        router.add_api_route("/prompt", self.queue_info, methods=["GET"])
        router.add_api_route("/interrupt", self.interrupt, methods=["POST"])
        router.add_api_route("/history", self.history, methods=["GET"])
        router.add_api_route("/history/{prompt_id}", self.history_of, methods=["GET"])
        router.add_api_route("/view", self.view, methods=["GET"], response_class=FileResponse)
        router.add_api_route("/object_info", self.object_info, methods=["GET"])
        router.add_api_route("/object_info/{node_class}", self.object_info_of, methods=["GET"])
        router.add_api_websocket_route("/ws", self.websocket)
        return router

    # POST /prompt

    async def post_prompt(self, request: Request) -> JSONResponse:
        """Queue an API-format prompt: {"prompt_id", "number", "node_errors"}, or 400 with ComfyUI's error shape."""
        self._check_origin(request.headers)
        try:  # any content type: ComfyUI's example posts JSON with urllib's default form content type
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            return _refused("invalid_prompt", "the request body is not JSON", str(error))
        prompt = body.get("prompt") if isinstance(body, dict) else None
        if not isinstance(prompt, dict) or not prompt:
            return _refused("no_prompt", "No prompt provided",
                            'the body is {"prompt": {node id: {"class_type", "inputs"}}, "client_id": ...}')
        client_id = body.get("client_id")
        return await run_in_threadpool(self._submit, prompt, client_id if isinstance(client_id, str) else None)

    def _submit(self, prompt: dict[str, Any], client_id: str | None) -> JSONResponse:
        from graphflow.comfy.importer import import_prompt

        config = self.service.config
        names: dict[str, list[str]] = {}
        try:
            imported = import_prompt(prompt, models_dir=config.models_dir, input_dir=config.input_roots()[0])
            names = imported.node_names
            document = self._with_outputs(imported.document, imported.outputs)
            jobs = prepare_jobs(self.service.checker, {}, template=None, document=document, params=None, batch=None,
                                options={}, priority=0)
        except ValidationError as error:
            return _node_errors(error.errors, prompt, names)
        except SubmitError as error:
            return _node_errors(error.errors or [GraphError(Code.INVALID_DOCUMENT, error.message)], prompt, names)
        job_id = uuid.uuid4().hex
        # recorded before the job is queued: a websocket that sees the job's first event already knows the prompt
        number = self.prompts.add(job_id, client_id, prompt, names, dict(imported.outputs))
        self.queue.submit(jobs, ids=[job_id])
        self.service.pool.notify()
        return JSONResponse({"prompt_id": job_id, "number": number, "node_errors": {}})

    def _with_outputs(self, document: dict[str, Any], outputs: dict[str, str]) -> dict[str, Any]:
        """The document with one graph output per ComfyUI output node (its node's first output: the files it wrote
        or its images), so the job's summary keeps them even when the node comes from cache."""
        named = dict(document.get("outputs") or {})
        for comfy_id, node in outputs.items():
            node_type = self.service.registry.get(document["nodes"][node]["type"])
            if node_type is not None and node_type.outputs:
                named[graph_output(comfy_id)] = f"{node}.{node_type.outputs[0].name}"
        return {**document, "outputs": named}

    async def interrupt(self, request: Request) -> dict[str, Any]:
        """Stop running prompts at their next step: the one named by {"prompt_id"}, else every running one (ComfyUI
        stops what runs); jobs submitted through /api/jobs are left alone."""
        self._check_origin(request.headers)
        try:
            body = json.loads(await request.body() or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = {}
        named = body.get("prompt_id") if isinstance(body, dict) else None
        return {"interrupted": await run_in_threadpool(self._interrupt, named)}

    def _interrupt(self, prompt_id: str | None) -> list[str]:
        running = [job.id for job in self.queue.jobs(RUNNING) if prompt_id in (None, job.id)]
        stopped = [job_id for job_id in running if self.prompts.get(job_id) is not None]
        for job_id in stopped:
            self.queue.cancel(job_id)
        return stopped

    def queue_info(self) -> dict[str, Any]:
        """GET /prompt: how many prompts are queued or running."""
        return _queue_status(self.queue.counts())

    # GET /history

    def history(self, max_items: Annotated[int | None, Query(ge=1)] = None) -> dict[str, Any]:
        """Every finished prompt (or the newest `max_items`), by prompt id, oldest first."""
        entries = {}
        for prompt in self.prompts.newest(max_items):
            entry = self._entry(prompt)
            if entry is not None:
                entries[prompt.job_id] = entry
        return entries

    def history_of(self, prompt_id: str) -> dict[str, Any]:
        """{prompt_id: entry} once the prompt has finished; {} before that, or for an id that is no prompt."""
        prompt = self.prompts.get(prompt_id)
        entry = self._entry(prompt) if prompt is not None else None
        return {prompt_id: entry} if entry is not None else {}

    def _entry(self, prompt: ComfyPrompt) -> dict[str, Any] | None:
        job = self.queue.get(prompt.job_id)
        if job is None or job.status not in FINISHED_STATUSES:
            return None
        return history_entry(prompt, job, self._job_events(job.id), self._outputs(prompt, job))

    def _job_events(self, job_id: str) -> list[Event]:
        events: list[Event] = []
        while batch := self.queue.events(events[-1].id if events else 0, job_id):
            events.extend(batch)
        return events

    def _outputs(self, prompt: ComfyPrompt, job: Job) -> NodeOutputs:
        summary = self.service.store.summary(job.result) if job.result else None
        return summary_outputs(prompt, summary, lambda path: output_place(path, self.outputs_root))

    # GET /view

    def view(self, filename: str, subfolder: str = "",
             folder_type: Annotated[str, Query(alias="type")] = "output") -> FileResponse:
        """A file a job wrote (type=output: the output folder) or an image kept in the results (type=temp); no name
        reaches outside those folders."""
        if not _plain_name(filename):
            raise HTTPException(400, "filename is one file name, without folders")
        if folder_type == "temp":
            path = self.service.store.path(filename) if not subfolder else None
        elif folder_type == "output":
            path = self._output_file(subfolder, filename)
        else:
            raise HTTPException(400, f"type is output or temp, not {folder_type!r}")
        if path is None:
            raise HTTPException(404, "no such file")
        media = "image/png" if path.suffix.lower() == ".png" else "application/octet-stream"
        return FileResponse(path, media_type=media, headers={"Content-Disposition": f'filename="{path.name}"'})

    def _output_file(self, subfolder: str, filename: str) -> Path | None:
        parts = [part for part in subfolder.split("/") if part] if subfolder else []
        if "\\" in subfolder or "\0" in subfolder or subfolder.startswith("/") or not all(map(_plain_name, parts)):
            raise HTTPException(403, "subfolder names folders inside the output folder")
        try:
            path = self.outputs_root.joinpath(*parts, filename).resolve()
        except (OSError, RuntimeError):
            return None
        if not path.is_relative_to(self.outputs_root):  # a symbolic link out of the folder
            raise HTTPException(403, "the file is outside the output folder")
        return path if path.is_file() else None

    # GET /object_info

    def object_info(self) -> dict[str, Any]:
        """The ComfyUI classes graphflow imports, as ComfyUI describes its node classes."""
        config = self.service.config
        return comfy_class_info(config.models_dir, config.input_roots()[0])

    def object_info_of(self, node_class: str) -> dict[str, Any]:
        if node_class not in COMFY_CLASSES:
            return {}
        return {node_class: self.object_info()[node_class]}

    # /ws

    async def websocket(self, websocket: WebSocket) -> None:
        """ComfyUI's message stream: `status` at once and whenever the queue changes, then each prompt's messages
        (to the client that posted it with its client_id; prompts posted without one, to every client)."""
        if not self._origin_allowed(websocket.headers):
            await websocket.close(code=1008)
            return
        await websocket.accept()
        sid = websocket.query_params.get("clientId") or uuid.uuid4().hex
        last = await run_in_threadpool(self.queue.last_event_id)
        await self._send(websocket, "status", {**await self._status(), "sid": sid})
        listening = asyncio.ensure_future(_until_closed(websocket))
        translators: dict[str, PromptMessages | None] = {}
        try:
            while not listening.done():
                events = await run_in_threadpool(self.queue.events, last)
                for event in events:
                    last = event.id
                    for kind, data in await run_in_threadpool(self._messages, translators, event, sid):
                        await self._send(websocket, kind, data)
                if not events:
                    await asyncio.wait({listening}, timeout=_WS_POLL_S)
        except (RuntimeError, OSError):  # the client went away while a message was sent
            return
        finally:
            listening.cancel()

    def _messages(self, translators: dict[str, PromptMessages | None], event: Event,
                  sid: str) -> list[tuple[str, dict[str, Any]]]:
        """The messages one event makes for the client `sid` (none for a job that is no prompt of it)."""
        if event.job_id not in translators:
            prompt = self.prompts.get(event.job_id)
            translators[event.job_id] = None if prompt is None else PromptMessages(
                prompt, lambda prompt=prompt: self._finished_outputs(prompt))
        translator = translators[event.job_id]
        if translator is None:
            return []
        messages = translator.feed(event) if translator.prompt.client_id in (None, sid) else []
        if event.kind in _QUEUE_CHANGES:
            messages.append(("status", _queue_status(self.queue.counts())))
            if event.kind != "job_queued":
                translators.pop(event.job_id)
        return messages

    def _finished_outputs(self, prompt: ComfyPrompt) -> NodeOutputs:
        job = self.queue.get(prompt.job_id)
        return self._outputs(prompt, job) if job is not None else {}

    async def _status(self) -> dict[str, Any]:
        return _queue_status(await run_in_threadpool(self.queue.counts))

    @staticmethod
    async def _send(websocket: WebSocket, kind: str, data: dict[str, Any]) -> None:
        await websocket.send_text(json.dumps({"type": kind, "data": data}, default=str))

    # origins

    def _check_origin(self, headers: Headers) -> None:
        if not self._origin_allowed(headers):
            raise HTTPException(403, "requests from other sites' pages are refused (see --cors-origin)")

    def _origin_allowed(self, headers: Headers) -> bool:
        """No Origin (a script), the server's own origin (its page), or one of --cors-origin."""
        origin = headers.get("origin")
        if origin is None:
            return True
        if origin.rstrip("/").lower() in self.allowed_origins:
            return True
        return urlsplit(origin).netloc.lower() == headers.get("host", "").lower()


async def _until_closed(websocket: WebSocket) -> None:
    """Read (and ignore) what the client sends, until it closes."""
    while (await websocket.receive())["type"] != "websocket.disconnect":
        pass


def _queue_status(counts: dict[str, int]) -> dict[str, Any]:
    return {"status": {"exec_info": {"queue_remaining": counts.get(PENDING, 0) + counts.get(RUNNING, 0)}}}


def _plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and not any(char in name for char in "/\\\0")


def _refused(kind: str, message: str, details: str) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message, "details": details, "extra_info": {}},
                         "node_errors": {}}, status_code=400)


def _node_errors(errors: list[GraphError], prompt: dict[str, Any], names: dict[str, list[str]]) -> JSONResponse:
    """400 with ComfyUI's shape: each problem under the prompt node it concerns (a graphflow node named back to
    the ComfyUI node it came from), the rest in "error"."""
    origin = {name: comfy_id for comfy_id, made in names.items() for name in made}
    outputs = [node_id for node_id, node in prompt.items() if isinstance(node, dict)
               and getattr(COMFY_CLASSES.get(str(node.get("class_type"))), "output_node", False)]
    by_node: dict[str, dict[str, Any]] = {}
    lines = []
    for error in errors:
        item = error.to_json()
        reason = {"type": str(item["code"]), "message": str(item["message"]),
                  "details": "; ".join(f"{key} {item[key]}" for key in ("input", "expected", "found")
                                       if item.get(key) is not None),
                  "extra_info": {"input_name": item.get("input")} if item.get("input") else {}}
        lines.append(str(error))
        comfy_id = origin.get(str(error.node), str(error.node)) if error.node is not None else None
        if comfy_id in prompt:
            node = prompt[comfy_id]
            entry = by_node.setdefault(comfy_id, {"errors": [], "dependent_outputs": outputs,
                                                  "class_type": node.get("class_type") if isinstance(node, dict)
                                                  else None})
            entry["errors"].append(reason)
    return JSONResponse({"error": {"type": "prompt_outputs_failed_validation",
                                   "message": "Prompt outputs failed validation", "details": "\n".join(lines),
                                   "extra_info": {}}, "node_errors": by_node}, status_code=400)
