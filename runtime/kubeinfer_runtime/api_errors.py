"""SageMaker-style JSON errors for every runtime role's FastAPI app.

The gateway, the model server (single-model, multi-model, pipeline) and the
async worker answer their control routes' errors, unknown routes included, the
way their inference routes do: ``{"ErrorCode", "Message", "message"}`` and
``x-amzn-ErrorType``, so boto3 raises the right exception everywhere. Kept
apart from the model server's modules so the gateway need not import them.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from kubeinfer_runtime.errors import NotFound, RuntimeServiceError, ValidationError, render_error


def error_response(err: RuntimeServiceError) -> Response:
    status, headers, body = render_error(err)
    # Starlette sets content-length itself; keep the rest.
    keep = {k.decode(): v.decode() for k, v in headers if k != b"content-length"}
    return Response(body, status_code=status, headers=keep)


def install_error_handlers(app: FastAPI, unknown_route_hint: str) -> None:
    """Answer every error of a runtime FastAPI app in SageMaker's JSON style.

    ``unknown_route_hint`` ends the 404 message, e.g. "see /docs for the model
    server's API".
    """

    @app.exception_handler(RuntimeServiceError)
    async def _service_error(_: Request, exc: RuntimeServiceError) -> Response:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            return error_response(NotFound(f"No route {request.method} {request.url.path}: "
                                           f"{unknown_route_hint}"))
        return error_response(ValidationError(str(exc.detail), status=exc.status_code))
