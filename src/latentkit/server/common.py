"""What every API of the server shares: the error it raises and the JSON it becomes, the
token check, reading a JSON body, and the HTTP status of each refusal from the queue.

The APIs (``app``'s native one, ``a1111``, ...) each live in a module of their own that
``app`` includes; they import these from here, not from ``app``, so no import goes in a
circle.
"""

from __future__ import annotations

import base64
import hmac
import json
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from latentkit.errors import ConfigError, LatentkitError, WeightsError
from latentkit.server.jobs import QueueFull
from latentkit.server.requests import UnknownName


class ApiError(Exception):
    """A refusal: its HTTP status, its one sentence and any headers (Retry-After, ...)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def bearer_check(token: str | None):
    """A dependency refusing calls without the token: ``Authorization: Bearer TOKEN``, or
    HTTP Basic auth whose password is the token (what AUTOMATIC1111 clients send)."""

    async def check(request: Request) -> None:
        if token is None:
            return
        if not _sent_token(request.headers.get("authorization", ""), token):
            raise ApiError(
                401, "a valid token is required: send the header Authorization: Bearer TOKEN "
                "(or HTTP Basic auth with the token as the password).",
                {"WWW-Authenticate": "Bearer"},
            )  # fmt: skip

    return check


def _sent_token(header: str, token: str) -> bool:
    """Whether an Authorization header carries ``token`` (compared in constant time)."""
    scheme, _, credentials = header.partition(" ")
    if scheme.lower() == "basic":
        try:
            credentials = base64.b64decode(credentials, validate=True).decode().partition(":")[2]
        except ValueError:  # bad base64 (binascii.Error) or not UTF-8
            return False
    elif scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(credentials.encode(), token.encode())


async def read_json(request: Request) -> Any:
    """The body as JSON (its size is capped by ``app.BodyLimit``)."""
    try:
        return json.loads(await request.body())
    except (ValueError, RecursionError):
        raise ApiError(422, "the request body must be a JSON object of settings.") from None


def refusal(err: LatentkitError) -> ApiError:
    """The HTTP answer to an error of the queue or of the request's check."""
    if isinstance(err, QueueFull):
        return ApiError(429, str(err), {"Retry-After": str(err.retry_after)})
    if isinstance(err, UnknownName):
        return ApiError(404, str(err))
    if isinstance(err, (ConfigError, WeightsError)):  # a bad setting, or a file it names
        return ApiError(422, str(err))
    return ApiError(500, str(err))
