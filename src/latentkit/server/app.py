"""The FastAPI application: the native API under ``/api/v1`` over a :class:`JobQueue`.

Every answer that is not a success is JSON ``{"error": "<one sentence>"}``. Bodies are
read here, not by FastAPI's models, so that the size limit holds before parsing (for every
route: :class:`BodyLimit`) and the one shared validator (``requests.check_request``) says
what is wrong, as it does for the CLI. Cross-origin calls are refused by browsers unless
the server is started with ``cors`` origins.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import HTTPException
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, StreamingResponse

from latentkit.config import VERSION
from latentkit.diffusion.samplers import SAMPLERS
from latentkit.errors import LatentkitError
from latentkit.generation.addons import available_loras
from latentkit.generation.options import FIELD_NAMES, MAX_IMAGES, SCHEDULES, GenerateOptions
from latentkit.generation.pipeline import image_size
from latentkit.server.a1111 import a1111_api
from latentkit.server.common import (
    ApiError,
    bearer_check,
    error_response,
    read_json,
    refusal,
)
from latentkit.server.jobs import FINISHED, JobQueue
from latentkit.server.openai_images import openai_api
from latentkit.server.page import page_routes
from latentkit.server.requests import MAX_SIDE, MAX_STEPS, PICTURE_FIELDS

MAX_BODY_BYTES = 16 << 20  # a few init pictures as base64; 50 MB is refused unread
EVENT_POLL_S = 0.05
_FIELDS_SCHEMA = {  # for the /docs page; the validator is check_request's, not this
    "type": "object",
    "properties": {
        "model": {"type": "string", "description": "a model name (GET /api/v1/models)"},
        **{name: {"description": "as latentkit generate's setting"} for name in FIELD_NAMES},
        "loras": {
            "type": "array",
            "description": 'LoRAs by name (GET /api/v1/loras): [{"name": NAME, "weight": 0.8}]',
        },
        **{
            name: {"type": "string", "description": "a picture as base64 text or a data: URL"}
            for name in PICTURE_FIELDS
        },
    },
    "required": ["prompt"],
}


class BodyLimit:
    """ASGI middleware: a request body past ``limit`` bytes is refused with 413, by its
    declared length before any of it is read, else as it arrives (``BodyTooLarge`` in the
    route that reads it)."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await error_response(413, self.message())(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise ApiError(413, self.message())
            return message

        return await self.app(scope, counted, send)

    def message(self) -> str:
        return f"the request body must be at most {self.limit:,} bytes."


def create_app(
    queue: JobQueue, *, token: str | None = None, cors: list[str] | None = None
) -> FastAPI:
    """The application over ``queue``; with ``token``, every API call needs
    ``Authorization: Bearer TOKEN``; ``cors`` lists the web origins allowed to call it from
    a browser (none by default). The caller starts and closes the queue."""
    app = FastAPI(title="latentkit", version=VERSION)
    app.add_middleware(BodyLimit)
    if cors:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=cors,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        return error_response(err.status, err.message, err.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):
        return error_response(err.status_code, str(err.detail), getattr(err, "headers", None))

    app.include_router(native_api(queue, token), prefix="/api/v1")
    app.include_router(a1111_api(queue, token), prefix="/sdapi/v1")
    app.include_router(openai_api(queue, token), prefix="/v1")
    app.include_router(page_routes())
    return app


async def read_settings(request: Request) -> Any:
    """A native job's fields: a JSON body, or a multipart form whose ``settings`` field is
    that JSON and whose ``init_image`` and ``mask`` fields are uploaded files."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return await read_json(request)
    try:
        form = await request.form(max_files=len(PICTURE_FIELDS), max_fields=8)
    except (ApiError, HTTPException):  # too large (BodyLimit), or Starlette's own limits
        raise
    except Exception:  # the multipart parser's own errors
        raise ApiError(422, "the multipart form could not be read.") from None
    unknown = sorted(set(form) - {"settings", *PICTURE_FIELDS})
    if unknown:
        raise ApiError(
            422, f"{unknown[0]!r} is not a form field; valid: settings, init_image, mask."
        )
    try:
        fields = json.loads(form.get("settings") or "{}")
    except (TypeError, ValueError):
        raise ApiError(
            422, "the form's settings field must be a JSON object of settings."
        ) from None
    if not isinstance(fields, dict):
        raise ApiError(422, "the form's settings field must be a JSON object of settings.")
    for name in PICTURE_FIELDS:
        upload = form.get(name)
        if upload is not None:
            fields[name] = await upload.read() if hasattr(upload, "read") else upload
    return fields


def native_api(queue: JobQueue, token: str | None) -> APIRouter:
    api = APIRouter(dependencies=[Depends(bearer_check(token))])

    def job_or_404(job_id: str):
        try:
            return queue.get(job_id)
        except LatentkitError as err:
            raise refusal(err) from None

    def urls(job_id: str, names: list[str]) -> list[str]:
        return [f"/api/v1/jobs/{job_id}/images/{name}" for name in names]

    @api.get("/models", summary="The models clients may name; the first is the default")
    async def models() -> dict:
        return {"models": list(queue.models), "default": next(iter(queue.models))}

    @api.get("/loras", summary="The LoRAs a request may name (loras field, <lora:NAME:W>)")
    async def loras() -> dict:
        return {"loras": list(available_loras(queue.folders.lora_dir))}

    @api.get("/capabilities", summary="Models, samplers, schedules, defaults and limits")
    async def capabilities() -> dict:
        return {
            "models": list(queue.models),
            "default": next(iter(queue.models)),
            "samplers": list(SAMPLERS),
            "schedules": list(SCHEDULES),
            "defaults": {
                f.name: f.default
                for f in dataclasses.fields(GenerateOptions)
                if f.default is not dataclasses.MISSING
            },
            "sizes": {name: image_size(c, GenerateOptions("")) for name, c in queue.models.items()},
            "limits": {
                "max_steps": MAX_STEPS,
                "max_side": MAX_SIDE,
                "max_images": MAX_IMAGES,
                "batch_limit": queue.batch_limit,
                "max_body_bytes": MAX_BODY_BYTES,
            },
        }

    @api.post(
        "/jobs",
        status_code=202,
        summary="Queue a job: generate settings as JSON plus model, init_image and mask "
        "(base64), or a multipart form (settings: that JSON; init_image, mask: files)",
        openapi_extra={
            "requestBody": {"content": {"application/json": {"schema": _FIELDS_SCHEMA}}}
        },
    )
    async def submit(request: Request) -> dict:
        body = await read_settings(request)
        try:
            job = queue.submit(body)
        except LatentkitError as err:
            raise refusal(err) from None
        return {"id": job.id, "state": job.state}

    @api.post(
        "/jobs/{job_id}/explain",
        status_code=202,
        summary="Queue an explain job for a done text-to-image job: its attention maps per "
        'token and its denoising steps, as two figures (body: optional {"index": picture})',
    )
    async def explain(job_id: str, request: Request) -> dict:
        body = await read_json(request) if await request.body() else {}
        if not isinstance(body, dict) or set(body) - {"index"}:
            raise ApiError(422, 'the body must be empty or {"index": N}, N a picture of the job.')
        try:
            job = queue.explain(job_id, body.get("index", 0))
        except LatentkitError as err:
            raise refusal(err) from None
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
            raise refusal(err) from None
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
            raise refusal(err) from None
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
