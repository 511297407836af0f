"""The API's request and response bodies (pydantic: it belongs here, at the service's edge)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class JobOptions(BaseModel):
    """Run options a job may set; the device, pixel limits and torch.compile are the server's."""

    model_config = ConfigDict(extra="forbid")
    dtype: Literal["auto", "fp16", "bf16", "fp32"] | None = None
    vae_tiling: bool | None = None
    vae_tile_size: int | None = Field(None, gt=0)
    vae_slicing: bool | None = None
    attention_slicing: Literal["auto", "max"] | int | None = None
    swap_controlnets: bool | None = None


class JobRequest(BaseModel):
    """A job (`params`) or a batch of jobs (`batch`) from a template of --graphs (`template`) or an inline
    `document`."""

    model_config = ConfigDict(extra="forbid")
    template: str | None = Field(None, description="a name from GET /api/templates")
    document: dict[str, Any] | None = Field(None, description="an inline graph document")
    params: dict[str, Any] | None = None
    batch: dict[str, Any] | None = Field(None, description='{"groups": [{NAME: [VALUE, ...]}], "repeat": N, '
                                                           '"fixed": {...}}: zipped within a group, multiplied across')
    options: JobOptions = Field(default_factory=JobOptions)
    priority: int = Field(0, ge=-1000, le=1000, description="higher runs first; FIFO within a priority")


class Submitted(BaseModel):
    id: str | None = None
    ids: list[str] | None = None


class Problem(BaseModel):
    """Why a request was refused; `errors` lists every validation error (code, node, input, expected, found)."""

    message: str
    errors: list[dict[str, Any]] = []


class JobView(BaseModel):
    id: str
    status: Literal["pending", "running", "completed", "failed", "cancelled"]
    priority: int
    created: float
    started: float | None
    finished: float | None
    template: str | None
    params: dict[str, Any]
    options: dict[str, Any]
    batch_id: str | None
    worker: str | None
    cancel_requested: bool
    error: dict[str, Any] | None
    files: list[str] = Field(description="URLs of the result PNGs")
    summary: str | None = Field(None, description="URL of the JSON summary: outputs, ran/cached nodes, timings")
    events: str = Field(description="URL of the job's event stream (SSE)")


class JobList(BaseModel):
    jobs: list[JobView]
    counts: dict[str, int]


class ParamView(BaseModel):
    type: str
    list: bool
    description: str
    required: bool
    default: Any = None
    min: float | None = None
    max: float | None = None
    choices: list[Any] | None = None


class TemplateView(BaseModel):
    name: str
    description: str
    params: dict[str, ParamView]


class Health(BaseModel):
    status: Literal["ok"]
    workers: int
    devices: dict[str, str] = Field(description="each worker's device, by worker name")
    counts: dict[str, int]


class Upload(BaseModel):
    """A stored upload: give `path` to a LoadImage (or any file input) of a job."""

    name: str
    path: str
    format: str
    width: int
    height: int


class Deleted(BaseModel):
    deleted: int
