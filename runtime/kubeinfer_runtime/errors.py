"""Errors the runtime answers clients with, rendered the way SageMaker does.

Every role (model server, gateway, later queue and batch workers) raises one of
these and renders it with :func:`render_error`, so a client sees the same error
shape everywhere. boto3's ``sagemaker-runtime`` client picks the exception class
from the ``x-amzn-ErrorType`` header (``"<code>:"``) and the message from the
JSON body, so both are always set. Open Inference Protocol routes (``/v2/...``)
answer the same error with the body V2 clients read, ``{"error": message}``
(:func:`render_v2_error`): same status, same headers.

This module depends on nothing but orjson: the gateway imports it without
pulling in the model server.
"""

from __future__ import annotations

import orjson

#: ASGI-style header list: lower-case names, bytes.
Headers = list[tuple[bytes, bytes]]
#: A whole HTTP response, ready to send: (status, headers, body).
Reply = tuple[int, Headers, bytes]

JSON_CONTENT_TYPE = b"application/json"


class RuntimeServiceError(Exception):
    """Base of every error the runtime turns into an HTTP response.

    ``status`` is the HTTP status, ``code`` the SageMaker error code (the
    exception name boto3 raises), ``message`` the text the user reads (Kubernetes
    style: capitalised, no final period, names the object, says the fix).
    ``headers`` are extra response headers the error needs (a 401's
    ``www-authenticate``); :func:`render_error` appends them.
    """

    def __init__(self, status: int, code: str, message: str, *,
                 headers: Headers | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers: Headers = list(headers) if headers else []

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.status}, {self.code!r}, {self.message!r})"


class ValidationError(RuntimeServiceError):
    """The request is malformed: bad body, wrong shape, unsupported type (400)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(status, "ValidationError", message)


class PayloadTooLarge(ValidationError):
    """The body exceeds the payload limit (413; SageMaker still says ValidationError)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=413)


class NotFound(ValidationError):
    """Unknown endpoint, variant or model (404; SageMaker says ValidationError)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=404)


class ModelError(RuntimeServiceError):
    """The model itself failed while predicting (424, SageMaker ModelError)."""

    def __init__(self, message: str) -> None:
        super().__init__(424, "ModelError", message)


class Throttled(RuntimeServiceError):
    """Too many concurrent requests (429)."""

    def __init__(self, message: str) -> None:
        super().__init__(429, "ThrottlingException", message)


class NotReady(RuntimeServiceError):
    """The model (or upstream) is not ready to serve (503)."""

    def __init__(self, message: str) -> None:
        super().__init__(503, "ServiceUnavailable", message)


class Internal(RuntimeServiceError):
    """A bug or an unexpected failure on our side (500)."""

    def __init__(self, message: str) -> None:
        super().__init__(500, "InternalFailure", message)


class InsufficientStorage(RuntimeServiceError):
    """A model cannot fit in the memory or disk budget (507, multi-model)."""

    def __init__(self, message: str) -> None:
        super().__init__(507, "InsufficientStorage", message)


def error_body(code: str, message: str) -> bytes:
    """The JSON body: both ``Message`` (botocore reads it) and ``message`` (most SDKs)."""
    return orjson.dumps({"ErrorCode": code, "Message": message, "message": message})


def render_error(err: RuntimeServiceError) -> Reply:
    """``(status, headers, body)`` ready to send, content headers included."""
    return _reply(err, error_body(err.code, err.message))


def render_v2_error(err: RuntimeServiceError) -> Reply:
    """As :func:`render_error`, with the V2 body ``{"error": message}`` (tritonclient,
    KServe clients); ``x-amzn-ErrorType`` stays (harmless, and says the code)."""
    return _reply(err, orjson.dumps({"error": err.message}))


def is_v2_path(path: str | bytes) -> bool:
    """Whether a request path is an Open Inference Protocol route (errors in V2 shape)."""
    if isinstance(path, bytes):
        return path == b"/v2" or path.startswith(b"/v2/")
    return path == "/v2" or path.startswith("/v2/")


def _reply(err: RuntimeServiceError, body: bytes) -> Reply:
    headers: Headers = [
        (b"content-type", JSON_CONTENT_TYPE),
        (b"content-length", str(len(body)).encode()),
        # The trailing colon is what AWS services send; botocore splits on it.
        (b"x-amzn-errortype", f"{err.code}:".encode()),
    ]
    headers.extend(err.headers)
    return err.status, headers, body
