"""The FastAPI application: the native API under ``/api/v1`` over a :class:`JobQueue`.

Every answer that is not a success is JSON ``{"error": "<one sentence>"}``. Bodies are
read here, not by FastAPI's models, so that the size limit holds before parsing and the
one shared validator (``jobs.check_request``) says what is wrong, as it does for the CLI.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import HTTPException
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

from latentkit.config import VERSION
from latentkit.errors import ConfigError, LatentkitError
from latentkit.generation.options import FIELD_NAMES
from latentkit.server.jobs import FINISHED, JobQueue, QueueFull, UnknownName
from latentkit.server.page import page_routes

MAX_JSON_BYTES = 1 << 20
EVENT_POLL_S = 0.05
_FIELDS_SCHEMA = {  # for the /docs page; the validator is check_request's, not this
    "type": "object",
    "properties": {
        "model": {"type": "string", "description": "a model name (GET /api/v1/models)"},
        **{name: {"description": "as latentkit generate's setting"} for name in FIELD_NAMES},
    },
    "required": ["prompt"],
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def create_app(queue: JobQueue, *, token: str | None = None) -> FastAPI:
    """The application over ``queue``; with ``token``, every ``/api`` call needs
    ``Authorization: Bearer TOKEN``. The caller starts and closes the queue."""
    app = FastAPI(title="latentkit", version=VERSION)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        return _error(err.status, err.message, err.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):
        return _error(err.status_code, str(err.detail), getattr(err, "headers", None))

    app.include_router(native_api(queue, token), prefix="/api/v1")
    app.include_router(page_routes())
    return app


def bearer_check(token: str | None):
    """A dependency refusing calls without the token (constant-time compare)."""
    expected = f"Bearer {token}".encode()

    async def check(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            raise ApiError(
                401, "a valid token is required: send the header Authorization: Bearer TOKEN.",
                {"WWW-Authenticate": "Bearer"},
            )  # fmt: skip

    return check


async def read_json(request: Request) -> Any:
    """The body as JSON, refused with 413 past ``MAX_JSON_BYTES`` before it is parsed
    (by its declared length, else as it arrives)."""
    too_big = ApiError(413, f"the request body must be at most {MAX_JSON_BYTES:,} bytes.")
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_JSON_BYTES):
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_JSON_BYTES:
            raise too_big
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, RecursionError):
        raise ApiError(422, "the request body must be a JSON object of settings.") from None


def _refusal(err: LatentkitError) -> ApiError:
    if isinstance(err, QueueFull):
        return ApiError(429, str(err), {"Retry-After": str(err.retry_after)})
    if isinstance(err, UnknownName):
        return ApiError(404, str(err))
    if isinstance(err, ConfigError):
        return ApiError(422, str(err))
    return ApiError(500, str(err))


def native_api(queue: JobQueue, token: str | None) -> APIRouter:
    api = APIRouter(dependencies=[Depends(bearer_check(token))])

    def job_or_404(job_id: str):
        try:
            return queue.get(job_id)
        except LatentkitError as err:
            raise _refusal(err) from None

    def urls(job_id: str, names: list[str]) -> list[str]:
        return [f"/api/v1/jobs/{job_id}/images/{name}" for name in names]

    @api.get("/models", summary="The models clients may name; the first is the default")
    async def models() -> dict:
        return {"models": list(queue.models), "default": next(iter(queue.models))}

    @api.post(
        "/jobs",
        status_code=202,
        summary="Queue a text-to-image job: generate settings as JSON, plus model",
        openapi_extra={
            "requestBody": {"content": {"application/json": {"schema": _FIELDS_SCHEMA}}}
        },
    )
    async def submit(request: Request) -> dict:
        body = await read_json(request)
        try:
            job = queue.submit(body)
        except LatentkitError as err:
            raise _refusal(err) from None
        return {"id": job.id, "state": job.state}

    @api.get("/jobs", summary="Recent jobs, newest first")
    async def recent() -> dict:
        return {"jobs": queue.recent()}

    @api.get("/jobs/{job_id}", summary="One job: state, step, total, result images")
    async def one(job_id: str) -> dict:
        job = job_or_404(job_id)
        with queue.lock:
            summary = job.summary()
        return {**summary, "image_urls": urls(job_id, summary["images"])}

    @api.post("/jobs/{job_id}/cancel", summary="Cancel: a running job stops at its next step")
    async def cancel(job_id: str) -> dict:
        try:
            job = queue.cancel(job_id)
        except LatentkitError as err:
            raise _refusal(err) from None
        return {"id": job.id, "state": job.state}

    @api.get(
        "/jobs/{job_id}/events",
        summary="Server-sent events: step (step, total, its, eta), then done/cancelled/failed",
    )
    async def events(job_id: str, request: Request) -> StreamingResponse:
        job = job_or_404(job_id)
        return StreamingResponse(_event_stream(job, request, urls), media_type="text/event-stream")

    @api.get("/jobs/{job_id}/images/{name}", summary="A result PNG, its parameters inside")
    async def image(job_id: str, name: str) -> FileResponse:
        try:
            path = queue.image_path(job_id, name)
        except LatentkitError as err:
            raise _refusal(err) from None
        return FileResponse(path, media_type="image/png")

    return api


async def _event_stream(job, request: Request, urls):
    """The job's events from the first, as SSE, until its last one (or the client goes)."""
    sent = 0
    while True:
        fresh = job.events[sent:]  # a list only appended to: a slice is a safe snapshot
        for event in fresh:
            data = {k: v for k, v in event.items() if k != "event"}
            if event["event"] == "done":
                data["image_urls"] = urls(job.id, data["images"])
            yield f"event: {event['event']}\ndata: {json.dumps(data)}\n\n"
            if event["event"] in FINISHED:
                return
        sent += len(fresh)
        if await request.is_disconnected():
            return
        await asyncio.sleep(EVENT_POLL_S)
