"""Which headers cross the gateway, in each direction: PURE.

Requests: SageMaker strips every header except those of the InvokeEndpoint
API, so the gateway forwards only ``contract.FORWARDED_REQUEST_HEADERS``
(Content-Type, Accept, custom attributes, inference id, target model, target
container) and consumes ``X-Amzn-SageMaker-Target-Variant`` itself. Hop-by-hop
and signing headers (Authorization, X-Amz-Date, Host, Content-Length, ...) stay
behind.

The InvokeEndpoint parameters a client sends as headers are held to SageMaker's
own limits (its API reference) before anything is forwarded, captured or
compared: ContentType, Accept and CustomAttributes at most 1024 characters of
printable ASCII, InferenceId 1 to 64 printable ASCII characters not starting
with a space, TargetModel at most 1024 characters, TargetVariant and
TargetContainerHostname names (letters, digits, hyphens) of at most 63, and
each of them at most once: a duplicate would let the gateway's capture and
comparison read one value while a model server reads the other. A request
that breaks one gets ``InboundHeaders.problem``, answered 400 without quoting
the value.

Responses: the model server's status and body go back unchanged, with the
headers boto3 reads (Content-Type, custom attributes) and, for errors,
``x-amzn-ErrorType`` so boto3 raises the right exception. The gateway adds
``x-Amzn-Invoked-Production-Variant``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kubeinfer_runtime.contract import (
    FORWARDED_REQUEST_HEADERS,
    H_CUSTOM_ATTRIBUTES,
    H_ERROR_TYPE,
    H_INFERENCE_ID,
    H_INVOKED_VARIANT,
    H_TARGET_CONTAINER,
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

#: SageMaker's pattern of variant and container names.
_NAME = re.compile(rb"[a-zA-Z0-9](-*[a-zA-Z0-9])*")
#: ``\A\S[\p{Print}]*\z``: printable ASCII, the first not a space.
_INFERENCE_ID_RE = re.compile(rb"[!-~][ -~]*")


@dataclass(frozen=True, slots=True)
class _Limit:
    """SageMaker's limit on one header parameter of InvokeEndpoint."""

    #: The header as clients write it, and boto3's parameter.
    header: str
    parameter: str
    max_chars: int
    #: Printable ASCII only.
    text: bool = True
    #: The whole value must match (None: any).
    pattern: re.Pattern[bytes] | None = None
    #: What ``pattern`` asks for, for the message.
    wants: str = ""


_LIMITS: dict[bytes, _Limit] = {
    b"content-type": _Limit("Content-Type", "ContentType", 1024),
    b"accept": _Limit("Accept", "Accept", 1024),
    H_CUSTOM_ATTRIBUTES.encode(): _Limit("X-Amzn-SageMaker-Custom-Attributes",
                                         "CustomAttributes", 1024),
    H_INFERENCE_ID.encode(): _Limit(
        "X-Amzn-SageMaker-Inference-Id", "InferenceId", 64, pattern=_INFERENCE_ID_RE,
        wants="1 to 64 printable ASCII characters, the first not a space"),
    H_TARGET_MODEL.encode(): _Limit("X-Amzn-SageMaker-Target-Model", "TargetModel", 1024,
                                    text=False),
    H_TARGET_CONTAINER.encode(): _Limit(
        "X-Amzn-SageMaker-Target-Container-Hostname", "TargetContainerHostname", 63,
        pattern=_NAME, wants="a container name: letters, digits and hyphens"),
    H_TARGET_VARIANT.encode(): _Limit(
        "X-Amzn-SageMaker-Target-Variant", "TargetVariant", 63, pattern=_NAME,
        wants="a variant name: letters, digits and hyphens"),
}


def header_problem(name: bytes, value: bytes) -> str | None:
    """Why ``value`` breaks SageMaker's limit on header ``name`` (None: it does not, or
    ``name`` is not an InvokeEndpoint parameter). Describes the value, never quotes it."""
    limit = _LIMITS.get(name)
    if limit is None:
        return None
    if len(value) > limit.max_chars:
        return (f"Header {limit.header} is {len(value)} bytes long: {limit.parameter} takes "
                f"at most {limit.max_chars} characters")
    if limit.text and not _printable_ascii(value):
        return (f"Header {limit.header} holds a character that is not printable ASCII: "
                f"{limit.parameter} is ASCII text")
    if limit.pattern is not None and not limit.pattern.fullmatch(value):
        return f"Header {limit.header} is not valid: {limit.parameter} takes {limit.wants}"
    return None


#: Printable ASCII and tab to a space, every other byte to NUL: what SageMaker's ASCII
#: parameters may hold is what ``translate`` turns into spaces only.
_TEXT_TABLE = bytes(0x20 if 0x20 <= b < 0x7F or b == 0x09 else 0 for b in range(256))


def _printable_ascii(value: bytes) -> bool:
    """Printable ASCII and tabs only (two C calls: on every request's headers)."""
    return not value.translate(_TEXT_TABLE).strip(b" ")


def _duplicate(name: bytes) -> str:
    limit = _LIMITS[name]
    return (f"Header {limit.header} appears more than once: send {limit.parameter} once")


@dataclass(slots=True)
class InboundHeaders:
    """What the gateway takes from a client's request headers."""

    forwarded: Headers
    target_variant: str | None
    #: The declared body size, or None (chunked, or absent/garbled).
    content_length: int | None
    #: X-Amzn-SageMaker-Target-Model (also forwarded): multi-model affinity key.
    target_model: str | None = None
    #: Why the request's InvokeEndpoint headers are refused (400), or None: the first
    #: value over SageMaker's limits, or a parameter sent twice (``header_problem``).
    problem: str | None = None


def split_request_headers(headers: Iterable[tuple[bytes, bytes]]) -> InboundHeaders:
    """Split ASGI request headers (lower-case names) into what to forward and use."""
    forwarded: Headers = []
    target: str | None = None
    length: int | None = None
    model: str | None = None
    problem: str | None = None
    target_seen = False
    seen: list[bytes] = []
    for name, value in headers:
        if name in FORWARDED:
            if problem is None:
                if name in seen:
                    problem = _duplicate(name)
                else:
                    seen.append(name)
                    problem = header_problem(name, value)
            forwarded.append((name, value))
            if name == TARGET_MODEL:
                model = value.decode("latin-1") or None
        elif name == TARGET_VARIANT:
            # An empty TargetVariant means "none" (botocore never sends one).
            stripped = value.strip()
            if problem is None:
                problem = (_duplicate(name) if target_seen
                           else header_problem(name, stripped) if stripped else None)
            target_seen = True
            target = stripped.decode("latin-1") or None
        elif name == CONTENT_LENGTH and value.isdigit():
            length = int(value)
    return InboundHeaders(forwarded, target, length, model, problem)


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
