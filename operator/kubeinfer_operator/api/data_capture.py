"""The ``spec.dataCapture`` block of an Endpoint: SageMaker's DataCaptureConfig.

Its own module so the Endpoint model stays readable; ``api.endpoint`` imports
it. Field descriptions become ``kubectl explain`` text. The gateway samples
and writes the records (``kubeinfer_runtime.gateway.capture``); this block
reaches it through the route table (``contract.capture.CaptureRoute``).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kubeinfer_runtime.contract.capture import (
    DEFAULT_CSV_CONTENT_TYPES,
    DEFAULT_JSON_CONTENT_TYPES,
    MAX_DESTINATION,
    CaptureRoute,
    destination_problem,
)

#: In the CRD: s3://bucket[/prefix] or file:///absolute/folder (local mode may also say
#: file://relative/folder, resolved against the manifest's folder).
_DESTINATION = "^(s3://[^/]+(/.*)?|file://.+)$"
#: A media type in lower case, without parameters (what a request's type is matched on).
_MEDIA_TYPE = r"^[a-z0-9][-a-z0-9!#$&^_.+]*/[-a-z0-9!#$&^_.+*]+$"
MAX_CONTENT_TYPES = 16


class CaptureMode(StrEnum):
    INPUT = "Input"
    OUTPUT = "Output"


class DataCapture(BaseModel):
    """Capture a sample of requests and responses, in SageMaker's capture format."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    enabled: Annotated[
        bool, Field(description="Capture while true (SageMaker EnableCapture); false keeps "
                                "the settings and captures nothing."),
    ] = True
    samplingPercentage: Annotated[
        int,
        Field(description="Share of requests captured, 0 to 100, each request drawn at "
                          "random (SageMaker InitialSamplingPercentage).", ge=0, le=100),
    ] = 20
    destination: Annotated[
        str,
        Field(description="Where records go: s3://bucket/prefix, or file:///folder (local "
                          "mode; file://relative/folder is resolved against the manifest's "
                          "folder). Objects are <destination>/<endpoint>/<variant>/yyyy/mm/dd/"
                          "hh/<mm-ss-mmm>-<uuid>.jsonl, JSON Lines in SageMaker's capture "
                          "format. s3:// uses the S3 credentials the model servers get (Helm "
                          "value runtime.s3.secretName).",
              min_length=1, max_length=MAX_DESTINATION, pattern=_DESTINATION),
    ]
    captureOptions: Annotated[
        list[CaptureMode],
        Field(description="What each record holds: Input (the request), Output (the "
                          "response), or both (SageMaker CaptureOptions).",
              min_length=1, max_length=2),
    ] = Field(default_factory=lambda: [CaptureMode.INPUT, CaptureMode.OUTPUT])
    csvContentTypes: Annotated[
        list[Annotated[str, Field(pattern=_MEDIA_TYPE, max_length=128)]],
        Field(description="Content types written as text with encoding CSV, in lower case "
                          "without parameters (a request's charset and other parameters are "
                          "ignored when matching); types in neither list are written as "
                          "BASE64.",
              max_length=MAX_CONTENT_TYPES),
    ] = Field(default_factory=lambda: list(DEFAULT_CSV_CONTENT_TYPES))
    jsonContentTypes: Annotated[
        list[Annotated[str, Field(pattern=_MEDIA_TYPE, max_length=128)]],
        Field(description="Content types written as text with encoding JSON.",
              max_length=MAX_CONTENT_TYPES),
    ] = Field(default_factory=lambda: list(DEFAULT_JSON_CONTENT_TYPES))

    @field_validator("destination")
    @classmethod
    def _check_destination(cls, value: str) -> str:
        if value.startswith("file://") and not value.startswith("file:///"):
            # Relative: resolved by local mode (``render.plan``); checked there.
            if ".." in value.split("/"):
                raise ValueError(f"destination {value!r} contains '..': name the folder "
                                 "without it")
            return value
        problem = destination_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> DataCapture:
        if len(set(self.captureOptions)) != len(self.captureOptions):
            raise ValueError("captureOptions repeats a mode; list Input and/or Output once each")
        both = sorted(set(self.csvContentTypes) & set(self.jsonContentTypes))
        if both:
            raise ValueError(f"{', '.join(both)}: a content type is in both csvContentTypes "
                             "and jsonContentTypes; list each in one of them")
        return self

    def route(self, destination: str | None = None) -> CaptureRoute | None:
        """The gateway's view (None when disabled); ``destination``: resolved (local mode)."""
        if not self.enabled:
            return None
        return CaptureRoute(
            destination=destination or self.destination,
            sampling_percentage=self.samplingPercentage,
            capture_input=CaptureMode.INPUT in self.captureOptions,
            capture_output=CaptureMode.OUTPUT in self.captureOptions,
            csv_content_types=tuple(self.csvContentTypes),
            json_content_types=tuple(self.jsonContentTypes))
