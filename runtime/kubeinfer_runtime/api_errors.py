"""SageMaker-style JSON errors for every runtime role's FastAPI app.

The gateway, the model server (single-model, multi-model, pipeline) and the
async worker answer their control routes' errors, unknown routes included, the
way their inference routes do: ``{"ErrorCode", "Message", "message"}`` and
``x-amzn-ErrorType``, so boto3 raises the right exception everywhere; under
``/v2`` the body is the Open Inference Protocol's ``{"error": message}``
instead (same status and headers), which V2 clients read. Kept apart from the
model server's modules so the gateway need not import them.

``bounded_body`` reads a control route's body within a limit (Starlette's
``request.body()`` reads any size), refusing as soon as it is over.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from kubeinfer_runtime.errors import (
    NotFound,
    RuntimeServiceError,
    ValidationError,
    is_v2_path,
    render_error,
    render_v2_error,
)


def error_response(err: RuntimeServiceError, *, v2: bool = False) -> Response:
    """The error as a response: SageMaker's body, or V2's (``{"error": ...}``) when ``v2``."""
    status, headers, body = render_v2_error(err) if v2 else render_error(err)
    # Starlette sets content-length itself; keep the rest.
    keep = {k.decode(): v.decode() for k, v in headers if k != b"content-length"}
    return Response(body, status_code=status, headers=keep)


def install_error_handlers(app: FastAPI, unknown_route_hint: str) -> None:
    """Answer every error of a runtime FastAPI app in SageMaker's JSON style (V2's under /v2).

    ``unknown_route_hint`` ends the 404 message, e.g. "see /docs for the model
    server's API".
    """

    @app.exception_handler(RuntimeServiceError)
    async def _service_error(request: Request, exc: RuntimeServiceError) -> Response:
        return error_response(exc, v2=is_v2_path(request.url.path))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        v2 = is_v2_path(request.url.path)
        if exc.status_code == 404:
            return error_response(NotFound(f"No route {request.method} {request.url.path}: "
                                           f"{unknown_route_hint}"), v2=v2)
        return error_response(ValidationError(str(exc.detail), status=exc.status_code), v2=v2)


async def bounded_body(request: Request, limit: int, too_large: RuntimeServiceError) -> bytes:
    """The request's body, at most ``limit`` bytes: ``too_large`` is raised for a declared
    Content-Length over it before anything is read, or as soon as the bytes pass it."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)
