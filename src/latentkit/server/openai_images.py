"""The OpenAI-compatible images API under ``/v1``: generations, edits and models, so that
the official ``openai`` client (``OpenAI(base_url=".../v1", api_key=TOKEN)``) and tools
built on it work against ``latentkit serve``.

Design:

- Each request is translated into the native job body and handed to ``queue.submit``: the
  one shared validator decides what is valid, this module never re-checks a setting. A
  refusal is re-worded only where OpenAI's name for a field differs from ours (``size`` is
  our ``width`` and ``height``, ``image`` our ``init_image``).
- The calls are synchronous, as OpenAI's are: the job is queued, then awaited. A client that
  disconnects before it ends cancels it (nobody could fetch the answer, and the openai
  client's retry after a timeout would otherwise queue the same work twice).
- Errors are OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with
  OpenAI's statuses (400 for any invalid field, where the native API answers 422), so the
  client raises its usual exceptions. A route class turns the shared helpers' ``ApiError``
  (the token check, the body size cap) into the same shape.
- OpenAI's own parameters either map onto ours (prompt, n, size, model, response_format),
  are accepted and ignored and listed in the ``X-Latentkit-Ignored`` header (quality, style,
  user, ...), or are accepted only at the value we produce (background, output_format,
  ...). Any other native generation setting (steps, seed, cfg, ...) may be sent beside
  them, as the client's ``extra_body``. Unknown names are refused, as OpenAI does.
- ``response_format="url"`` answers links to ``/v1/images/files/...`` signed with a key
  made at start-up and valid for an hour, like OpenAI's pre-signed links: they work in an
  ``<img>`` tag, without the token, and only for that one picture.

docs/serving.md ("OpenAI-compatible API") is the user's account of all this.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import json
import re
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import HTTPException
from fastapi.responses import FileResponse, JSONResponse
from fastapi.routing import APIRoute
from PIL import Image
from starlette.datastructures import UploadFile

from latentkit.config import brief_repr
from latentkit.errors import ConfigError, LatentkitError, WeightsError
from latentkit.generation.options import FIELD_NAMES
from latentkit.generation.pipeline import image_size
from latentkit.server.common import ApiError, bearer_check, read_json
from latentkit.server.jobs import JobQueue, QueueFull, wait_finished
from latentkit.server.requests import UnknownName, decode_picture

# OpenAI parameters accepted whatever their value and without effect here.
IGNORED = (
    "quality", "style", "user", "safety_identifier", "moderation", "input_fidelity", "complexity",
)  # fmt: skip
# OpenAI parameters accepted only at the value this server produces anyway (or null).
ONLY_VALUES: dict[str, tuple[Any, ...]] = {
    "background": ("auto", "opaque"),
    "output_format": ("png",),
    "output_compression": (100,),
    "stream": (False,),
    "partial_images": (0,),
}
# OpenAI parameters for outputs this server cannot make: accepted only when null.
UNSUPPORTED = ("svg", "markup", "frame_count", "frame_duration_ms")
RESPONSE_FORMATS = ("b64_json", "url")
# Names of OpenAI's own models: clients that hard-code one get the server's default model.
OPENAI_MODEL_NAMES = re.compile(r"(dall-e-|gpt-image-|chatgpt-image-)")
# Native settings a client may add (extra_body); size and n are OpenAI's spelling of ours.
EXTENSIONS = tuple(name for name in FIELD_NAMES if name not in ("width", "height", "prompt", "n"))
OPENAI_FIELDS = ("prompt", "model", "n", "size", "response_format")
# Form fields (edits) arrive as text; these are read as JSON numbers or booleans.
NON_TEXT_FIELDS = (
    "n", "steps", "cfg", "guidance_rescale", "seed", "eta", "clip_skip", "strength",
    "vae_tiling", "output_compression", "stream", "partial_images", "frame_count",
    "frame_duration_ms",
)  # fmt: skip
SIZE_PATTERN = re.compile(r"([0-9]{1,6})x([0-9]{1,6})")
# What a refusal names as OpenAI's parameter when the validator names ours.
OPENAI_NAME_OF = {"width": "size", "height": "size", "init_image": "image"}
SEED_RANGE = 2**32  # a seed picked for a request that gave none, as the A1111 API does
URL_LIFETIME_S = 3600  # as long as OpenAI's pre-signed links last
MAX_FORM_FILES = 4
MAX_FORM_FIELDS = 64
DISCONNECT_POLL_S = 0.25


class OpenAIRefusal(Exception):
    """A refusal in OpenAI's shape; ``param`` is OpenAI's name of the field at fault."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code, self.kind, self.headers = code, kind, headers

    def response(self) -> JSONResponse:
        error = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": error}, status_code=self.status, headers=self.headers)


def bad_field(param: str | None, message: str, code: str | None = None) -> OpenAIRefusal:
    return OpenAIRefusal(400, message, param=param, code=code)


def from_api_error(err: ApiError) -> OpenAIRefusal:
    """The shared helpers' refusals (token, body size, body not JSON) in OpenAI's shape."""
    if err.status == 401:
        return OpenAIRefusal(401, err.message, code="invalid_api_key", headers=err.headers)
    status = 400 if err.status == 422 else err.status
    return OpenAIRefusal(status, err.message, headers=err.headers)


class OpenAIRoute(APIRoute):
    """A route whose refusals, its dependencies' included, are OpenAI's error shape."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def answer(request: Request):
            try:
                return await handler(request)
            except OpenAIRefusal as err:
                return err.response()
            except ApiError as err:
                return from_api_error(err).response()

        return answer


@dataclass
class Translated:
    """An OpenAI request as a native job body, and what the answer needs to know."""

    body: dict[str, Any]
    response_format: str = "b64_json"
    size: str | None = None  # as given, when it is WIDTHxHEIGHT
    ignored: list[str] = field(default_factory=list)


def translate(fields: Any) -> Translated:
    """The native job body for OpenAI's fields (generations and edits share them)."""
    if not isinstance(fields, Mapping):
        raise bad_field(None, "the request body must be a JSON object of parameters.")
    translated = Translated(body={})
    for name, value in fields.items():
        take_field(translated, str(name), value)
    translated.body.setdefault("seed", secrets.randbelow(SEED_RANGE))
    return translated


def take_field(translated: Translated, name: str, value: Any) -> None:
    body = translated.body
    if name in IGNORED:
        if value is not None:
            translated.ignored.append(name)
    elif name in ONLY_VALUES:
        check_only_values(name, value)
    elif name in UNSUPPORTED:
        if value is not None:
            raise bad_field(name, f"{name} is not supported by this server; leave it out.")
    elif name == "model":
        take_model(translated, value)
    elif name == "size":
        take_size(translated, value)
    elif name == "response_format":
        take_response_format(translated, value)
    elif name in ("prompt", "n") or name in EXTENSIONS:
        if value is not None:
            body[name] = value
    else:
        valid = ", ".join((*OPENAI_FIELDS, *EXTENSIONS))
        raise bad_field(
            name,
            f"unknown parameter {brief_repr(name)}; valid: {valid} (and OpenAI's quality, "
            "style, user, background, output_format).",
            code="unknown_parameter",
        )


def check_only_values(name: str, value: Any) -> None:
    allowed = ONLY_VALUES[name]
    if value is not None and not any(value == a and type(value) is type(a) for a in allowed):
        choices = " or ".join(json.dumps(a) for a in allowed)
        raise bad_field(
            name, f"{name} must be {choices} on this server (or left out), got {brief_repr(value)}."
        )


def take_model(translated: Translated, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, str) and OPENAI_MODEL_NAMES.match(value):
        translated.ignored.append("model")  # the server's default model draws it
        return
    translated.body["model"] = value


def take_size(translated: Translated, value: Any) -> None:
    if value is None or value == "auto":
        return
    found = SIZE_PATTERN.fullmatch(value) if isinstance(value, str) else None
    if found is None:
        raise bad_field(
            "size",
            "size must be WIDTHxHEIGHT in pixels (such as 512x512) or auto, "
            f"got {brief_repr(value)}.",
        )
    translated.size = value
    translated.body["width"], translated.body["height"] = int(found[1]), int(found[2])


def take_response_format(translated: Translated, value: Any) -> None:
    if value is None:
        return
    if value not in RESPONSE_FORMATS:
        raise bad_field(
            "response_format",
            f"response_format must be b64_json or url, got {brief_repr(value)}.",
        )
    translated.response_format = value


def param_of(message: str, sent: Iterable[str]) -> str | None:
    """The field a validator's sentence is about: the first of the fields sent it names."""
    named = [
        (found.start(), name)
        for name in sent
        if (found := re.search(rf"\b{re.escape(name)}s?\b", message)) is not None
    ]
    return min(named)[1] if named else None


def refusal_of(err: LatentkitError, translated: Translated) -> OpenAIRefusal:
    """The queue's refusal of a translated request, in OpenAI's terms."""
    if isinstance(err, QueueFull):
        return OpenAIRefusal(
            429,
            str(err),
            kind="requests",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(err.retry_after)},
        )
    if isinstance(err, UnknownName):
        return OpenAIRefusal(404, str(err), param="model", code="model_not_found")
    if not isinstance(err, (ConfigError, WeightsError)):  # WeightsError: a LoRA it names
        return OpenAIRefusal(500, str(err), kind="server_error")
    native = param_of(str(err), {"prompt", *translated.body})
    param = OPENAI_NAME_OF.get(native, native)
    message = str(err)
    if param == "size":
        message = f"size {translated.size} is refused: {message}"
    elif param != native:
        message = f"{param}: {message}"
    return bad_field(param, message)


def submit(queue: JobQueue, translated: Translated):
    try:
        return queue.submit(translated.body)
    except LatentkitError as err:
        raise refusal_of(err, translated) from None


async def wait_or_cancel(queue: JobQueue, job, request: Request) -> None:
    """Wait for the job to finish; cancel it if the client goes away first."""
    waiting = asyncio.ensure_future(wait_finished(job))
    try:
        while not waiting.done():
            await asyncio.wait({waiting}, timeout=DISCONNECT_POLL_S)
            if not waiting.done() and await request.is_disconnected():
                queue.cancel(job.id)
                await waiting
    finally:
        waiting.cancel()


def unfinished_refusal(job) -> OpenAIRefusal:
    if job.state == "cancelled":
        return OpenAIRefusal(
            409,
            "the job was cancelled before it finished (from the native API, or the server "
            "is stopping).",
            kind="server_error",
        )
    return OpenAIRefusal(500, job.error or "the generation failed.", kind="server_error")


class LinkSigner:
    """Signed, expiring links to result pictures: the signature is the permission, so a
    link works without the token, for its one picture, until it expires."""

    def __init__(self) -> None:
        self.key = secrets.token_bytes(32)

    def signature(self, job_id: str, name: str, expires: int) -> str:
        message = f"{job_id}/{name}/{expires}".encode()
        return hmac.new(self.key, message, hashlib.sha256).hexdigest()

    def query(self, job_id: str, name: str) -> str:
        expires = int(time.time()) + URL_LIFETIME_S
        return f"expires={expires}&signature={self.signature(job_id, name, expires)}"

    def check(self, job_id: str, name: str, query: Mapping[str, str]) -> None:
        expires, signature = query.get("expires", ""), query.get("signature", "")
        if not expires.isdigit() or len(expires) > 12:
            raise OpenAIRefusal(403, "this image link's signature is not valid.")
        expected = self.signature(job_id, name, int(expires))
        if not hmac.compare_digest(expected.encode(), signature.encode()):
            raise OpenAIRefusal(403, "this image link's signature is not valid.")
        if int(expires) < time.time():
            raise OpenAIRefusal(
                403, "this image link has expired; links last an hour: ask for the image again."
            )


def picture_size(queue: JobQueue, job) -> str:
    width, height = image_size(queue.models[job.model], job.options)
    return f"{width}x{height}"


def read_b64(paths) -> list[str]:
    return [base64.b64encode(path.read_bytes()).decode("ascii") for path in paths]


async def images_answer(
    queue: JobQueue, job, translated: Translated, request: Request, signer: LinkSigner
) -> JSONResponse:
    with queue.lock:
        names = list(job.images)
    if translated.response_format == "url":
        data = [{"url": image_url(request, signer, job.id, name)} for name in names]
    else:
        paths = [queue.image_path(job.id, name) for name in names]
        data = [{"b64_json": b64} for b64 in await asyncio.to_thread(read_b64, paths)]
    content = {
        "created": int(job.created),
        "data": data,
        "size": picture_size(queue, job),
        "output_format": "png",
        "background": "opaque",
    }
    headers = {"X-Latentkit-Model": job.model}
    if translated.ignored:
        headers["X-Latentkit-Ignored"] = ", ".join(translated.ignored)
    return JSONResponse(content, headers=headers)


def image_url(request: Request, signer: LinkSigner, job_id: str, name: str) -> str:
    base = request.url_for("openai_image_file", job_id=job_id, name=name)
    return f"{base}?{signer.query(job_id, name)}"


async def run_to_answer(
    queue: JobQueue, translated: Translated, request: Request, signer: LinkSigner
) -> JSONResponse:
    job = submit(queue, translated)
    await wait_or_cancel(queue, job, request)
    if job.state != "done":
        raise unfinished_refusal(job)
    return await images_answer(queue, job, translated, request, signer)


# Edits: multipart/form-data with the picture, an optional mask and the same parameters.


async def read_form(request: Request) -> tuple[dict[str, Any], dict[str, list[bytes]]]:
    """(fields, files by field name) of a multipart/form-data body (its size is capped
    for every route by the app's ``BodyLimit``)."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise bad_field(None, "an edit must be sent as multipart/form-data (image, mask, prompt).")
    try:
        form = await request.form(max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FIELDS)
    except HTTPException as err:  # Starlette's words for a form it cannot parse
        raise bad_field(None, f"the multipart form could not be read ({err.detail}).") from None
    fields, files = {}, {}
    try:
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                files.setdefault(name.removesuffix("[]"), []).append(await value.read())
            else:
                fields[name] = form_value(name, value)
    finally:
        await form.close()
    return fields, files


def form_value(name: str, text: str) -> Any:
    """A form field's text as the JSON value it stands for, for fields that are not text."""
    if name not in NON_TEXT_FIELDS:
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text  # the validator names the field and what it must be


def one_file(files: dict[str, list[bytes]], name: str, *, required: bool) -> bytes | None:
    found = files.pop(name, [])
    if len(found) > 1:
        raise bad_field(name, f"{name} must be one picture on this server, got {len(found)}.")
    if not found and required:
        raise bad_field(name, f"{name} is missing; send the picture to edit as a file field.")
    return found[0] if found else None


def refuse_pictures_as_text(fields: dict[str, Any]) -> None:
    for name in ("image", "image[]", "mask"):
        if name in fields:
            raise bad_field(name, f"{name} must be sent as a file, not as a text field.")


def refuse_other_files(files: dict[str, list[bytes]]) -> None:
    for name in files:
        raise bad_field(name, f"unknown file field {brief_repr(name)}; valid: image, mask.")


def picture(data: bytes, name: str) -> Image.Image:
    """The shared decoder's picture (its pixel cap checked before decoding)."""
    try:
        return decode_picture(data, name)
    except ConfigError as err:
        raise bad_field(name, str(err)) from None


def transparency(picture: Image.Image) -> Image.Image | None:
    """The alpha channel when some pixel of it is fully transparent, else None."""
    if picture.mode == "P" and "transparency" in picture.info:
        picture = picture.convert("RGBA")
    if "A" not in picture.getbands():
        return None
    alpha = picture.getchannel("A")
    return alpha if alpha.getextrema()[0] == 0 else None


def repaint_mask(alpha: Image.Image) -> bytes:
    """OpenAI's mask (fully transparent = edit) as ours (white = repaint), as a PNG."""
    out = io.BytesIO()
    alpha.point(lambda a: 255 if a == 0 else 0).save(out, format="PNG")
    return out.getvalue()


def edit_alpha(image_data: bytes, mask_data: bytes | None) -> Image.Image | None:
    """The alpha that says where to edit: the mask's, else the image's own transparency
    (OpenAI's rule), else None (no transparent pixel: the whole picture is reworked)."""
    if mask_data is None:
        return transparency(picture(image_data, "image"))
    alpha = transparency(picture(mask_data, "mask"))
    if alpha is None:
        raise bad_field(
            "mask",
            "the mask must have an alpha channel whose fully transparent pixels mark where to "
            "edit; it has no transparent pixel.",
        )
    return alpha


def add_edit_pictures(translated: Translated, image_data: bytes, mask_data: bytes | None) -> None:
    """The picture (and mask) as the job's init image (and mask): with a mask, the masked
    area is drawn anew (strength 1); without, the whole picture is reworked (img2img at
    the default strength). Either way a ``strength`` sent beside wins. With no size, the
    picture's own is kept (the shared validator's rule for init images)."""
    alpha = edit_alpha(image_data, mask_data)
    body = translated.body
    body["init_image"] = image_data
    if alpha is not None:
        body["mask"] = repaint_mask(alpha)
        body.setdefault("strength", 1.0)


# The router.


def openai_api(queue: JobQueue, token: str | None) -> APIRouter:
    """OpenAI's images API over ``queue``; with ``token``, the API key must be it."""
    api = APIRouter(route_class=OpenAIRoute)
    needs_key = [Depends(bearer_check(token))]
    signer = LinkSigner()
    started = int(time.time())

    def model_entry(name: str) -> dict:
        return {"id": name, "object": "model", "created": started, "owned_by": "latentkit"}

    @api.get("/models", dependencies=needs_key, summary="The models (OpenAI's list shape)")
    async def models() -> dict:
        return {"object": "list", "data": [model_entry(name) for name in queue.models]}

    @api.get("/models/{model}", dependencies=needs_key, summary="One model (OpenAI's shape)")
    async def one_model(model: str) -> dict:
        if model not in queue.models:
            raise OpenAIRefusal(
                404,
                f"no model is named {brief_repr(model)}; valid: {', '.join(queue.models)}.",
                param="model",
                code="model_not_found",
            )
        return model_entry(model)

    @api.post(
        "/images/generations",
        dependencies=needs_key,
        summary="Text to image, answered when done (OpenAI's images.generate)",
    )
    async def generations(request: Request) -> JSONResponse:
        translated = translate(await read_json(request))
        return await run_to_answer(queue, translated, request, signer)

    @api.post(
        "/images/edits",
        dependencies=needs_key,
        summary="Inpainting or image to image, answered when done (OpenAI's images.edit)",
    )
    async def edits(request: Request) -> JSONResponse:
        fields, files = await read_form(request)
        refuse_pictures_as_text(fields)
        image = one_file(files, "image", required=True)
        mask = one_file(files, "mask", required=False)
        refuse_other_files(files)
        translated = translate(fields)
        await asyncio.to_thread(add_edit_pictures, translated, image, mask)
        return await run_to_answer(queue, translated, request, signer)

    @api.get(
        "/images/files/{job_id}/{name}",
        name="openai_image_file",
        summary="A result PNG by its signed link (response_format=url)",
    )
    async def image_file(job_id: str, name: str, request: Request) -> FileResponse:
        signer.check(job_id, name, request.query_params)
        try:
            path = queue.image_path(job_id, name)
        except LatentkitError as err:
            raise OpenAIRefusal(404, str(err)) from None
        return FileResponse(path, media_type="image/png")

    return api
