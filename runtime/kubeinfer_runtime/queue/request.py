"""The queued asynchronous request and everything pure around it.

A request travels as a flat Redis Stream entry (str -> str). Parsing the
client's headers, deciding expiry, and writing notification and failure bodies
happen here without I/O, so the gateway and the worker stay short and these
rules are unit-tested directly.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from kubeinfer_runtime.contract import (
    ASYNC_MAX_INVOCATION_TIMEOUT_S,
    ASYNC_MAX_REQUEST_TTL_S,
    H_ASYNC_ACCEPT,
    H_ASYNC_CONTENT_TYPE,
    H_CUSTOM_ATTRIBUTES,
    H_FILENAME,
    H_INFERENCE_ID,
    H_INPUT_LOCATION,
    H_INVOCATION_TIMEOUT,
    H_REQUEST_TTL,
    H_S3_OUTPUT_PATH_EXTENSION,
    AsyncRoute,
    failure_location,
    output_location,
)
from kubeinfer_runtime.contract.async_paths import FormerAsyncPaths
from kubeinfer_runtime.contract.locations import (
    describe_prefixes,
    location_problem,
    normalize_prefix,
    within,
)
from kubeinfer_runtime.errors import ValidationError
from kubeinfer_runtime.storage.target import MAX_SEGMENT_BYTES

# The header patterns below are used with ``fullmatch`` only: ``match`` with a final
# ``$`` lets a trailing newline through.

#: SageMaker's InferenceId pattern: printable, at most 64 characters. Narrower
#: here (no '/' or whitespace) because the id becomes part of an object key.
_INFERENCE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
#: SageMaker's minimum RequestTTLSeconds.
MIN_REQUEST_TTL_S = 60
#: S3OutputPathExtension as botocore's model allows it (its ``(?!s3:|https:)`` guard
#: is implied: ':' is not in the set). It may still hold '..', '.' or empty
#: segments and a leading '/': ``path_extension`` normalises and refuses those.
_PATH_EXTENSION = re.compile(r"[A-Za-z0-9!_.*'()/-]{1,512}")
#: Filename as botocore's model allows it: a plain name, at most one '.', no '/'.
_FILENAME = re.compile(r"(?!.*\..*\.)[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")


@dataclass(frozen=True)
class AsyncRequest:
    """One asynchronous request as queued (all fields survive a round trip as str)."""

    inference_id: str
    endpoint: str
    input_location: str
    output_location: str
    failure_location: str
    content_type: str
    accept: str
    custom_attributes: str
    #: Unix time the gateway accepted it, and when it expires unprocessed.
    received_at: float
    expires_at: float
    invocation_timeout_s: float

    def to_fields(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> AsyncRequest:
        """Rebuild from a stream entry; raises ValueError when fields are missing or bad."""
        try:
            req = cls(
                inference_id=fields["inference_id"], endpoint=fields["endpoint"],
                input_location=fields["input_location"],
                output_location=fields["output_location"],
                failure_location=fields["failure_location"],
                content_type=fields["content_type"], accept=fields["accept"],
                custom_attributes=fields["custom_attributes"],
                received_at=float(fields["received_at"]),
                expires_at=float(fields["expires_at"]),
                invocation_timeout_s=float(fields["invocation_timeout_s"]),
            )
        except KeyError as e:
            raise ValueError(f"queued request lacks field {e.args[0]!r}") from None
        # The gateway validated them; a hand-made or corrupted entry must still not
        # make a worker write outside an object location (it is dead-lettered).
        problem = (location_problem(req.output_location, "output_location")
                   or location_problem(req.failure_location, "failure_location"))
        if problem:
            raise ValueError(problem)
        return req

    def expired(self, now: float, *, entry_id: str | None = None,
                queue_now: float | None = None) -> bool:
        """Whether the request outlived its RequestTTLSeconds.

        ``received_at`` and ``expires_at`` are the gateway's clock; a worker's may differ
        by minutes (a worker 2 minutes ahead expired every request with a TTL under that
        as soon as it took it). With the stream ``entry_id`` (its milliseconds are the
        Redis server's clock at the XADD) and ``queue_now`` (Redis's time as the worker
        estimates it), the TTL runs on one clock; else on ``now`` (the worker's).
        """
        queued_ms = entry_ms(entry_id) if entry_id and queue_now is not None else None
        if queued_ms is not None and queue_now is not None:
            return queue_now >= queued_ms / 1000 + (self.expires_at - self.received_at)
        return now >= self.expires_at


def entry_ms(entry_id: str) -> int | None:
    """The milliseconds of a Redis stream entry id (``<ms>-<seq>``), None if it is not one."""
    ms, dash, seq = entry_id.partition("-")
    return int(ms) if dash and ms.isdigit() and seq.isdigit() else None


@dataclass(frozen=True)
class Confinement:
    """Where a worker may read and write, re-checked for every dequeued request.

    The gateway already refused anything else, but whoever can write to Redis
    can queue an entry; the worker must not become a way to read files or
    other tenants' objects, nor to write outside the endpoint's paths.
    """

    input_prefixes: tuple[str, ...]
    output_path: str
    failure_path: str
    #: (outputPath, failurePath, until): the endpoint's paths before its spec changed,
    #: for requests accepted under them (``contract.async_paths``).
    former: tuple[tuple[str, str, float], ...] = ()

    @classmethod
    def of(cls, input_paths: list[str] | tuple[str, ...], output_path: str,
           failure_path: str, former: list[FormerAsyncPaths] | None = None) -> Confinement:
        return cls(tuple(normalize_prefix(p) for p in input_paths),
                   normalize_prefix(output_path), normalize_prefix(failure_path),
                   tuple((normalize_prefix(f.outputPath), normalize_prefix(f.failurePath),
                          f.until) for f in former or ()))

    def destination_problem(self, req: AsyncRequest, now: float) -> str | None:
        """Why ``req`` may not be written where it says (no object is written then)."""
        for output, failure, until in self.former:
            # Both locations below one former pair, as the gateway made them then.
            if now < until and within(req.output_location, (output,)) \
                    and within(req.failure_location, (failure,)):
                return None
        if not within(req.output_location, (self.output_path,)):
            return (f"output_location {req.output_location[:300]!r} is outside the endpoint's "
                    f"outputPath {self.output_path}")
        if not within(req.failure_location, (self.failure_path,)):
            return (f"failure_location {req.failure_location[:300]!r} is outside the "
                    f"endpoint's failurePath {self.failure_path}")
        return None

    def input_problem(self, req: AsyncRequest) -> str | None:
        """Why ``req``'s input may not be read (a failure object says so)."""
        problem = location_problem(req.input_location, "InputLocation")
        if problem:
            return problem[0].upper() + problem[1:]
        if not within(req.input_location, self.input_prefixes):
            return (f"InputLocation {req.input_location[:300]!r} is outside the endpoint's "
                    f"input paths ({describe_prefixes(self.input_prefixes)}): upload the "
                    "input below one of them, or add its folder to spec.async.inputPath")
        return None


def _int_header(value: str | None, name: str, low: int, high: int) -> int | None:
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        raise ValidationError(f"Header {name} is {value[:40]!r}, not a whole number of seconds: "
                              f"send a value from {low} to {high}") from None
    if not low <= number <= high:
        raise ValidationError(f"Header {name} is {number}: send a value from {low} to {high}")
    return number


def path_extension(value: str | None) -> str:
    """The client's S3OutputPathExtension as a normalised relative folder ("" when absent).

    Empty and '.' segments and leading or trailing '/' are dropped (so S3 and
    file:// name the same object); '..' is refused rather than resolved, so the
    result always stays below the endpoint's output and failure paths. A segment
    longer than a file name may be (255 bytes) is refused too: on a file:// path
    no worker could ever write below it.
    """
    if not value:
        return ""
    name = "X-Amzn-SageMaker-S3OutputPathExtension"
    if not _PATH_EXTENSION.fullmatch(value):
        raise ValidationError(f"Header {name} {value[:600]!r} is not valid: use 1 to 512 "
                              "letters, digits, '/' or !_.*'()- (no s3:// or https:// "
                              "prefix; it is appended to the endpoint's outputPath)")
    segments = [s for s in value.split("/") if s not in ("", ".")]
    if ".." in segments:
        raise ValidationError(f"Header {name} {value!r} contains '..': name a folder below "
                              "the endpoint's outputPath, without parent segments")
    if not segments:
        raise ValidationError(f"Header {name} {value!r} names no folder: send a relative "
                              "folder such as 'tenant-a/2026-05', or leave the header out")
    longest = max(segments, key=len)
    if len(longest.encode()) > MAX_SEGMENT_BYTES:
        raise ValidationError(f"Header {name} has a folder name of {len(longest.encode())} "
                              f"bytes ({longest[:40]!r}...): use folder names of at most "
                              f"{MAX_SEGMENT_BYTES} bytes, split by '/'")
    return "/".join(segments)


def filename(value: str | None) -> str:
    """The client's Filename ("" when absent), or a ValidationError."""
    if not value:
        return ""
    if not _FILENAME.fullmatch(value):
        raise ValidationError(f"Header X-Amzn-SageMaker-Filename {value[:100]!r} is not "
                              "valid: use 1 to 32 letters, digits, '-', '_' or '.', starting "
                              "with a letter or digit, with at most one '.' and no '/'")
    return value


def _below(base: str, location: str, header: str) -> str:
    """``location`` when it names an object strictly below ``base``; else a ValidationError.

    Belt and braces for the place: ``path_extension`` and ``filename`` already make
    it true. Not for the length: an extension can make an S3 key too long.
    """
    problem = location_problem(location, "Location")
    if problem:
        raise ValidationError(f"Header {header} would put the object where it cannot be "
                              f"written ({problem}): send a shorter relative folder")
    if not location.startswith(base.rstrip("/") + "/"):
        raise ValidationError(f"Header {header} would put the object at {location!r}, "
                              f"outside {base!r}: send a relative folder without '..'")
    return location


def parse_async_request(endpoint: str, route: AsyncRoute, headers: dict[str, str], *,
                        now: float | None = None, new_id: str | None = None) -> AsyncRequest:
    """The request a client's InvokeEndpointAsync headers describe, or a ValidationError.

    ``headers`` maps lower-case names to values. The InferenceId is the client's
    (idempotency key) or a new UUID. S3OutputPathExtension and Filename place the
    output (and the failure object, see ``failure_location``) below the route's paths.
    """
    now = time.time() if now is None else now
    input_location = headers.get(H_INPUT_LOCATION)
    if not input_location:
        raise ValidationError(f'Asynchronous request to endpoint "{endpoint}" has no '
                              "X-Amzn-SageMaker-InputLocation header: upload the payload and "
                              "name its s3:// or file:// location there")
    problem = location_problem(input_location, "InputLocation")
    if problem:
        raise ValidationError(problem[0].upper() + problem[1:])
    if not within(input_location, route.input_paths):
        raise ValidationError(
            f"Header X-Amzn-SageMaker-InputLocation {input_location[:300]!r} is outside the "
            f'input paths of endpoint "{endpoint}" ({describe_prefixes(route.input_paths)}): '
            "upload the input below one of them, or add its folder to spec.async.inputPath")
    inference_id = headers.get(H_INFERENCE_ID) or new_id or str(uuid.uuid4())
    if not _INFERENCE_ID.fullmatch(inference_id):
        raise ValidationError(f"InferenceId {inference_id[:100]!r} is not valid: use 1 to 64 "
                              "letters, digits, '.', '_', ':' or '-', starting with a letter "
                              "or digit")
    ttl = _int_header(headers.get(H_REQUEST_TTL), "X-Amzn-SageMaker-RequestTTLSeconds",
                      MIN_REQUEST_TTL_S, ASYNC_MAX_REQUEST_TTL_S) or route.request_ttl_s
    timeout = _int_header(headers.get(H_INVOCATION_TIMEOUT),
                          "X-Amzn-SageMaker-InvocationTimeoutSeconds", 1,
                          ASYNC_MAX_INVOCATION_TIMEOUT_S) or route.invocation_timeout_s
    extension = path_extension(headers.get(H_S3_OUTPUT_PATH_EXTENSION))
    name = filename(headers.get(H_FILENAME))
    where = "X-Amzn-SageMaker-S3OutputPathExtension"
    return AsyncRequest(
        inference_id=inference_id, endpoint=endpoint, input_location=input_location,
        output_location=_below(route.output_path, output_location(
            route.output_path, inference_id, extension=extension, filename=name), where),
        failure_location=_below(route.failure_path, failure_location(
            route.failure_path, inference_id, extension=extension, filename=name), where),
        content_type=headers.get(H_ASYNC_CONTENT_TYPE, "application/json"),
        accept=headers.get(H_ASYNC_ACCEPT, ""),
        custom_attributes=headers.get(H_CUSTOM_ATTRIBUTES, ""),
        received_at=now, expires_at=now + ttl, invocation_timeout_s=float(timeout),
    )


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def notification(req: AsyncRequest, *, ok: bool, now: float, region: str = "",
                 failure_reason: str = "", output_content_type: str = "") -> bytes:
    """The JSON a success or error webhook receives: SageMaker's SNS message shape.

    Delivery is at least once: receivers deduplicate by ``inferenceId``.
    """
    body: dict[str, Any] = {
        "awsRegion": region,
        "eventTime": _iso(now),
        "receivedTime": _iso(req.received_at),
        "invocationStatus": "Completed" if ok else "Failed",
        "requestParameters": {
            "accept": req.accept, "contentType": req.content_type,
            "customAttributes": req.custom_attributes, "endpointName": req.endpoint,
            "inputLocation": req.input_location,
        },
        "inferenceId": req.inference_id,
        "eventVersion": "1.0",
        "eventSource": "aws:sagemaker",
    }
    if ok:
        body["responseParameters"] = {"contentType": output_content_type,
                                      "outputLocation": req.output_location}
    else:
        body["responseParameters"] = {"contentType": "application/json",
                                      "failureLocation": req.failure_location}
        body["failureReason"] = failure_reason
    return orjson.dumps(body)


def failure_body(req: AsyncRequest, code: str, message: str, attempts: int) -> bytes:
    """The failure object: what went wrong, in the runtime's error shape."""
    return orjson.dumps({"ErrorCode": code, "Message": message, "message": message,
                         "inferenceId": req.inference_id, "inputLocation": req.input_location,
                         "attempts": attempts})
