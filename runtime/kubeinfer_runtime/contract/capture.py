"""Data capture as the operator hands it to the gateway (SageMaker's DataCaptureConfig).

The operator renders an Endpoint's ``spec.dataCapture`` into the route table
(``EndpointRoute.capture``), so a new sampling rate or destination takes
effect when the gateway reloads the table, without a restart, and the
gateway's records of earlier settings are still uploaded. The gateway's
memory bounds for capture are process settings (``GatewaySettings.capture_*``).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: SageMaker Python SDK's defaults (``DataCaptureConfig``): bodies of these types are
#: written as text with encoding CSV / JSON; every other type as BASE64.
DEFAULT_CSV_CONTENT_TYPES = ("text/csv",)
DEFAULT_JSON_CONTENT_TYPES = ("application/json",)
#: Longest destination SageMaker accepts (DestinationS3Uri).
MAX_DESTINATION = 512


def destination_problem(destination: str) -> str | None:
    """Why ``destination`` cannot receive captures, or None: ``s3://bucket[/prefix]`` or
    ``file:///absolute/dir``, without ``..`` segments."""
    if destination.startswith("s3://"):
        bucket = destination[5:].split("/", 1)[0]
        if not bucket:
            return f"destination {destination!r} names no bucket: use s3://bucket/prefix"
    elif destination.startswith("file:///"):
        if not destination[8:].strip("/"):
            return (f"destination {destination!r} names no folder: use "
                    "file:///absolute/folder")
    else:
        return (f"destination {destination!r} must be s3://bucket/prefix or "
                "file:///absolute/folder")
    if ".." in destination.split("/"):
        return f"destination {destination!r} contains '..': name the folder without it"
    return None


class CaptureRoute(BaseModel):
    """What the gateway captures for one endpoint, and where it writes it."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)  # see contract._Strict

    #: ``s3://bucket/prefix`` or ``file:///dir``; objects go to
    #: ``<destination>/<endpoint>/<variant>/yyyy/mm/dd/hh/<mm-ss-mmm-uuid>.jsonl``.
    destination: Annotated[str, Field(min_length=1, max_length=MAX_DESTINATION)]
    #: Share of requests captured, 0 to 100 (each request drawn at random).
    sampling_percentage: Annotated[float, Field(ge=0, le=100)] = 20.0
    capture_input: bool = True
    capture_output: bool = True
    #: Content types (lower case, without parameters) written as text: encoding CSV / JSON.
    csv_content_types: tuple[str, ...] = DEFAULT_CSV_CONTENT_TYPES
    json_content_types: tuple[str, ...] = DEFAULT_JSON_CONTENT_TYPES

    @field_validator("destination")
    @classmethod
    def _check_destination(cls, value: str) -> str:
        problem = destination_problem(value)
        if problem:
            raise ValueError(problem)
        return value.rstrip("/")

    @field_validator("csv_content_types", "json_content_types")
    @classmethod
    def _normalise(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(media_type(v) for v in value if media_type(v)))


def media_type(content_type: str) -> str:
    """``text/csv; charset=utf-8`` -> ``text/csv``: what content-type lists are matched on."""
    return content_type.split(";", 1)[0].strip().lower()
