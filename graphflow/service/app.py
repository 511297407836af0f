"""The HTTP API of `graphflow serve` (FastAPI): templates, jobs and batches, live events (SSE), results, uploads,
and ComfyUI's API (graphflow.service.comfy_routes).

    app = create_app(config, token=load_or_create_token(config.data)[0])
    uvicorn.run(app, host="127.0.0.1", port=8188)
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import fields
from typing import Annotated, Any, Literal

from fastapi import APIRouter, FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse

from graphflow.errors import ValidationError
from graphflow.registry import default_registry
from graphflow.service.comfy_routes import comfy_routers
from graphflow.service.config import ServiceConfig, TemplateFolder
from graphflow.service.graph_svg import graph_svg
from graphflow.service.models import (
    Deleted,
    Health,
    JobList,
    JobRequest,
    JobView,
    Problem,
    Submitted,
    TemplateView,
    Upload,
)
from graphflow.service.page import PAGE
from graphflow.service.queue import FINAL_EVENTS, FINISHED_STATUSES, RUNNING, Job, JobQueue
from graphflow.service.results import ResultStore
from graphflow.service.security import BearerAuth, BodyLimit
from graphflow.service.submit import SubmitError, prepare_jobs
from graphflow.service.uploads import UploadError, store_upload
from graphflow.service.worker import WorkerPool, job_source

Status = Literal["pending", "running", "completed", "failed", "cancelled"]
_SSE_POLL_S = 0.1
_SSE_KEEPALIVE_S = 15.0
_FINAL_KINDS = frozenset(FINAL_EVENTS.values())


class Service:
    """What the routes share: the queue, the results, the workers and the Engine that checks submits."""

    def __init__(self, config: ServiceConfig) -> None:
        from graphflow.engine import Engine

        config.prepare()
        self.config = config
        self.registry = default_registry(config.plugins)
        self.queue = JobQueue(config.database)
        self.store = ResultStore(config.results)
        self.templates = TemplateFolder(config.graphs)
        self.checker = Engine(self.registry, input_dirs=list(config.input_roots()), output_dir=config.outputs,
                              cache_bytes=1 << 20)
        if config.backend == "ray":  # the graphflow[ray] extra: only imported when asked for
            from graphflow.service.ray_workers import RayWorkerPool

            self.pool: Any = RayWorkerPool(config, self.queue, self.store, self.templates.path, self.registry)
        else:
            self.pool = WorkerPool(config, self.queue, self.store, self.templates.path, self.registry)

    def view(self, job: Job) -> JobView:
        summary = self.store.summary(job.result) if job.result else None
        files = [f"/api/files/{name}" for name in (summary or {}).get("files", [])]
        # the fields Job and JobView share, copied by name, so a field added to both needs no third list here
        shown = {field.name: getattr(job, field.name) for field in fields(job) if field.name in JobView.model_fields}
        return JobView(**shown, files=files, summary=f"/api/files/{job.result}" if job.result else None,
                       events=f"/api/jobs/{job.id}/events")


def create_app(config: ServiceConfig, *, token: str | None, cors_origins: tuple[str, ...] = (),
               start_workers: bool = True) -> FastAPI:
    """The ASGI app; `token` None turns authentication off (the CLI allows that on loopback hosts only)."""
    service = Service(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.queue.recover(requeue=config.requeue)
        if start_workers:
            service.pool.start()
        yield
        await run_in_threadpool(service.pool.stop)

    app = FastAPI(title="graphflow", summary="Run graphflow templates and documents as queued jobs",
                  lifespan=lifespan, responses={422: {"model": Problem}})
    app.state.service = service
    app.include_router(_routes(service))
    for router in comfy_routers(service, cors_origins):
        app.include_router(router)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(PAGE)

    @app.exception_handler(RequestValidationError)
    async def malformed(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = [{"code": "invalid_request", "message": item.get("msg", ""), "node": None,
                     "input": ".".join(str(part) for part in item.get("loc", ())), "expected": item.get("type", ""),
                     "found": repr(item.get("input"))[:200]} for item in error.errors()]
        return JSONResponse(Problem(message="the request does not have the shape the API takes (see /openapi.json)",
                                    errors=problems).model_dump(), status_code=422)

    @app.exception_handler(SubmitError)
    async def refused(request: Request, error: SubmitError) -> JSONResponse:
        return JSONResponse(Problem(message=error.message, errors=[e.to_json() for e in error.errors]).model_dump(),
                            status_code=422)

    if token is not None:
        app.add_middleware(BearerAuth, token=token)  # type: ignore[arg-type]
    app.add_middleware(BodyLimit, limit=config.body_bytes, upload_limit=config.upload_bytes + (64 << 10))  # type: ignore[arg-type]
    if cors_origins:  # outermost: preflight requests carry no token
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type", "Last-Event-ID"])
    return app


def _routes(service: Service) -> APIRouter:
    router = APIRouter(prefix="/api")
    queue = service.queue

    def existing(job_id: str) -> Job:
        job = queue.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        return job

    @router.get("/health", response_model=Health)
    def health() -> Health:
        return Health(status="ok", workers=len(service.pool.workers),
                      devices={worker.name: worker.device for worker in service.pool.workers}, counts=queue.counts())

    @router.get("/templates", response_model=list[TemplateView])
    def templates() -> list[TemplateView]:
        return [TemplateView.model_validate({"name": info.name, "description": info.description,
                                             "params": info.params})
                for info in service.templates.templates().values()]

    @router.post("/jobs", response_model=Submitted, response_model_exclude_none=True,
                 responses={422: {"model": Problem}})
    def submit(request: JobRequest) -> Submitted:
        jobs = prepare_jobs(service.checker, service.templates.templates(), template=request.template,
                            document=request.document, params=request.params, batch=request.batch,
                            options=request.options.model_dump(exclude_none=True), priority=request.priority)
        ids = queue.submit(jobs)
        service.pool.notify()
        return Submitted(ids=ids) if request.batch is not None else Submitted(id=ids[0])

    @router.get("/jobs", response_model=JobList)
    def jobs(status: Status | None = None,
             limit: Annotated[int, Query(ge=1, le=10_000)] = 200) -> JobList:
        return JobList(jobs=[service.view(job) for job in queue.jobs(status, limit)], counts=queue.counts())

    @router.delete("/jobs", response_model=Deleted)
    def clear_history() -> Deleted:
        return Deleted(deleted=queue.clear_history())

    @router.get("/jobs/{job_id}", response_model=JobView)
    def job(job_id: str) -> JobView:
        return service.view(existing(job_id))

    @router.post("/jobs/{job_id}/cancel", response_model=JobView)
    def cancel(job_id: str) -> JobView:
        job = existing(job_id)
        if job.status in FINISHED_STATUSES:
            raise HTTPException(409, f"job {job_id} is already {job.status}")
        return service.view(queue.cancel(job_id) or job)

    @router.delete("/jobs/{job_id}", response_model=Deleted)
    def delete(job_id: str) -> Deleted:
        status = queue.delete(job_id)
        if status is None:
            raise HTTPException(404, f"no job {job_id}")
        if status == RUNNING:
            raise HTTPException(409, f"job {job_id} is running: cancel it first")
        return Deleted(deleted=1)

    @router.get("/jobs/{job_id}/events", response_class=StreamingResponse)
    async def job_events(job_id: str, request: Request, after: int | None = None) -> StreamingResponse:
        await run_in_threadpool(existing, job_id)
        return _stream(request, queue, job_id, after)

    @router.get("/events", response_class=StreamingResponse)
    async def all_events(request: Request, after: int | None = None) -> StreamingResponse:
        return _stream(request, queue, None, after)

    @router.get("/jobs/{job_id}/graph.svg", response_class=Response)
    def graph(job_id: str) -> Response:
        job = existing(job_id)
        try:
            compiled = service.checker.compile(job_source(job, service.templates.path), job.params)
        except ValidationError as error:
            raise HTTPException(409, f"the job's document no longer compiles: {error}") from None
        return Response(graph_svg(compiled), media_type="image/svg+xml")

    @router.get("/files/{name}", response_class=FileResponse)
    def file(name: str) -> FileResponse:
        path = service.store.path(name)
        if path is None:
            raise HTTPException(404, "no such result file")
        media = "image/png" if name.endswith(".png") else "application/json"
        return FileResponse(path, media_type=media, headers={"Cache-Control": "public, max-age=31536000, immutable"})

    @router.post("/images", response_model=Upload, status_code=201)
    async def upload(file: Annotated[UploadFile, File(description="the image (PNG, JPEG or WebP)")]) -> Upload:
        data = await file.read(service.config.upload_bytes + 1)
        try:
            return await run_in_threadpool(store_upload, data, service.config)
        except UploadError as error:
            raise HTTPException(error.status, str(error)) from None

    return router


def _stream(request: Request, queue: JobQueue, job_id: str | None, after: int | None) -> StreamingResponse:
    """Events after `after` or the Last-Event-ID header, from the database, then live; a job's stream ends with
    its final event."""
    header = request.headers.get("last-event-id", "")
    start = after if after is not None else int(header) if header.isdigit() else 0

    async def lines() -> AsyncIterator[str]:
        last, quiet = start, 0.0
        while not await request.is_disconnected():
            events = await run_in_threadpool(queue.events, last, job_id)
            for event in events:
                last = event.id
                data = {"kind": event.kind, "job": event.job_id, "time": event.time, **event.data}
                yield f"id: {event.id}\ndata: {json.dumps(data, default=str)}\n\n"
                if job_id is not None and event.kind in _FINAL_KINDS:
                    return
            if events:
                quiet = 0.0
                continue
            if job_id is not None and await run_in_threadpool(_ended, queue, job_id, last):
                return
            await asyncio.sleep(_SSE_POLL_S)
            quiet += _SSE_POLL_S
            if quiet >= _SSE_KEEPALIVE_S:
                quiet = 0.0
                yield ": keep-alive\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _ended(queue: JobQueue, job_id: str, last: int) -> bool:
    """Whether a job's stream has nothing more to send: the job is gone, or finished with its events sent."""
    status = queue.status(job_id)
    return status is None or (status in FINISHED_STATUSES and not queue.events(last, job_id, limit=1))
