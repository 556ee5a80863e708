"""Which headers cross the gateway, in each direction: PURE.

Requests: SageMaker strips every header except those of the InvokeEndpoint
API, so the gateway forwards only ``contract.FORWARDED_REQUEST_HEADERS``
(Content-Type, Accept, custom attributes, inference id, target model, target
container) and consumes ``X-Amzn-SageMaker-Target-Variant`` itself. Hop-by-hop
and signing headers (Authorization, X-Amz-Date, Host, Content-Length, ...) stay
behind.

Responses: the model server's status and body go back unchanged, with the
headers boto3 reads (Content-Type, custom attributes) and, for errors,
``x-amzn-ErrorType`` so boto3 raises the right exception. The gateway adds
``x-Amzn-Invoked-Production-Variant``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kubeinfer_runtime.contract import (
    FORWARDED_REQUEST_HEADERS,
    H_CUSTOM_ATTRIBUTES,
    H_ERROR_TYPE,
    H_INVOKED_VARIANT,
    H_TARGET_MODEL,
    H_TARGET_VARIANT,
)

Headers = list[tuple[bytes, bytes]]

FORWARDED = frozenset(h.encode() for h in FORWARDED_REQUEST_HEADERS)
TARGET_VARIANT = H_TARGET_VARIANT.encode()
TARGET_MODEL = H_TARGET_MODEL.encode()
INVOKED_VARIANT = H_INVOKED_VARIANT.encode()
CONTENT_LENGTH = b"content-length"
#: Response headers copied from the model server to the client.
RETURNED = frozenset((b"content-type", H_CUSTOM_ATTRIBUTES.encode(), H_ERROR_TYPE.encode()))


@dataclass(slots=True)
class InboundHeaders:
    """What the gateway takes from a client's request headers."""

    forwarded: Headers
    target_variant: str | None
    #: The declared body size, or None (chunked, or absent/garbled).
    content_length: int | None
    #: X-Amzn-SageMaker-Target-Model (also forwarded): multi-model affinity key.
    target_model: str | None = None


def split_request_headers(headers: Iterable[tuple[bytes, bytes]]) -> InboundHeaders:
    """Split ASGI request headers (lower-case names) into what to forward and use."""
    forwarded: Headers = []
    target: str | None = None
    length: int | None = None
    model: str | None = None
    for name, value in headers:
        if name in FORWARDED:
            forwarded.append((name, value))
            if name == TARGET_MODEL:
                model = value.decode("latin-1") or None
        elif name == TARGET_VARIANT:
            # An empty TargetVariant means "none" (botocore never sends one).
            target = value.decode("latin-1").strip() or None
        elif name == CONTENT_LENGTH and value.isdigit():
            length = int(value)
    return InboundHeaders(forwarded, target, length, model)


def response_headers(upstream: Iterable[tuple[bytes, bytes]], variant: bytes,
                     body_length: int) -> Headers:
    """Headers of the client's response, given the model server's."""
    out: Headers = [(name, value) for name, value in upstream if name in RETURNED]
    out.append((INVOKED_VARIANT, variant))
    out.append((CONTENT_LENGTH, b"%d" % body_length))
    return out


def request_target(scope: Mapping[str, Any]) -> bytes:
    """An ASGI request's target as the client sent it (still percent-encoded), query
    included: what a SigV4 signature covers."""
    path: bytes = scope.get("raw_path") or scope["path"].encode("latin-1")
    query: bytes = scope.get("query_string", b"")
    return path + b"?" + query if query else path
