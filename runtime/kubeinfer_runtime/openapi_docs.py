"""What FastAPI cannot see of our routes, described in each app's OpenAPI (``/docs``).

Every runtime role serves its inference routes on a lean raw-ASGI path in
front of FastAPI (see ``server/hotpath.py``), so FastAPI never sees them and
would leave them out of ``/docs`` and ``/openapi.json``. Users look there
first, so :func:`document_routes` adds them to the generated document: no
stub handlers, nothing FastAPI could route to. Routes FastAPI does serve but
whose bodies they read themselves (to bound their size before parsing and to
word their refusals) name their body's model with :func:`json_body`, and
:func:`document_models` puts those models in the document's components.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

#: What the model server accepts on ``/invocations`` (and returns, by Accept).
INFERENCE_CONTENT: dict[str, Any] = {
    "application/json": {"schema": {"type": "object"}},
    "text/csv": {"schema": {"type": "string"}},
    "application/x-npy": {"schema": {"type": "string", "format": "binary"}},
    "application/x-npz": {"schema": {"type": "string", "format": "binary"}},
}
#: V2 infer: JSON, or (binary data extension) a JSON header and raw tensors.
V2_CONTENT: dict[str, Any] = {
    "application/json": {"schema": {"type": "object"}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
}
V2_INFER_DESCRIPTION = (
    "`{\"inputs\": [{\"name\", \"shape\", \"datatype\", \"data\"}]}`, or with the binary "
    "data extension (header `Inference-Header-Content-Length`: the JSON part's length) "
    "inputs with `parameters.binary_data_size` and their raw bytes after the JSON; outputs "
    "come back as binary data when `parameters.binary_data_output` (or an output's "
    "`parameters.binary_data`) is true. Errors: `{\"error\": \"...\"}`.")
#: SageMaker-style error body every route answers with.
_ERROR = {"application/json": {"schema": {"type": "object", "properties": {
    "ErrorCode": {"type": "string"}, "Message": {"type": "string"},
    "message": {"type": "string"}}}}}
_ERRORS = {
    "400": "ValidationError: bad body, shape, dtype or header",
    "404": "ValidationError: unknown endpoint, variant, model or container",
    "413": "ValidationError: payload over the limit",
    "424": "ModelError: the model (or a pipeline step) failed",
    "429": "ThrottlingException: over maxConcurrency (serverless)",
    "503": "ServiceUnavailable: not ready yet",
}


@dataclass(frozen=True)
class Header:
    name: str
    description: str
    required: bool = False


#: The request headers ``/invocations`` reads (besides the multi-model target).
INVOCATION_HEADERS = (
    Header("Content-Type", "application/json, text/csv, application/x-npy or "
                           "application/x-npz"),
    Header("Accept", "application/json (default), text/csv, application/x-npy or "
                     "application/x-npz (every output)"),
    Header("X-Amzn-SageMaker-Custom-Attributes", "`output=<name>`: the output a CSV or .npy "
                                                 "answer carries (default: the first)"),
)


@dataclass(frozen=True)
class Route:
    """One POST operation served outside FastAPI."""

    path: str
    summary: str
    description: str = ""
    request: Mapping[str, Any] = field(default_factory=lambda: INFERENCE_CONTENT)
    response: Mapping[str, Any] = field(default_factory=lambda: INFERENCE_CONTENT)
    headers: Sequence[Header] = ()
    status: int = 200

    def operation(self) -> dict[str, Any]:
        params: list[dict[str, Any]] = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in _path_params(self.path)]
        params += [{"name": h.name, "in": "header", "required": h.required,
                    "description": h.description, "schema": {"type": "string"}}
                   for h in self.headers]
        responses: dict[str, Any] = {str(self.status): {"description": "Success",
                                                        "content": dict(self.response)}}
        responses.update({code: {"description": text, "content": _ERROR}
                          for code, text in _ERRORS.items()})
        return {"summary": self.summary, "description": self.description,
                "operationId": "post_" + _path_params_free(self.path),
                "parameters": params,
                "requestBody": {"required": True, "content": dict(self.request)},
                "responses": responses}


def _path_params(path: str) -> list[str]:
    return [part[1:-1].split(":")[0] for part in path.split("/")
            if part.startswith("{") and part.endswith("}")]


def _path_params_free(path: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in path).strip("_")


def document_routes(app: FastAPI, routes: Sequence[Route]) -> None:
    """Make ``app``'s OpenAPI document list ``routes`` (built once, on first request)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            paths = schema.setdefault("paths", {})
            for route in routes:
                paths.setdefault(route.path, {})["post"] = route.operation()
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


#: Where a model's schema lives in the document (and where nested models point).
_COMPONENT = "#/components/schemas/{model}"


def json_body(model: type[BaseModel], media_type: str = "application/json",
              description: str = "") -> dict[str, Any]:
    """``openapi_extra`` of a route that reads its body itself: ``model`` is what it takes.

    The schema is referenced, not inlined: :func:`document_models` must add ``model``.
    """
    body: dict[str, Any] = {"required": True, "content": {
        media_type: {"schema": {"$ref": _COMPONENT.format(model=model.__name__)}}}}
    if description:
        body["description"] = description
    return {"requestBody": body}


def text_body(media_type: str, description: str) -> dict[str, Any]:
    """``openapi_extra`` of a route that reads a text body itself (JSON Lines, CSV...)."""
    return {"requestBody": {"required": True, "description": description,
                            "content": {media_type: {"schema": {"type": "string"}}}}}


def document_models(app: FastAPI, models: Sequence[type[BaseModel]]) -> None:
    """Make ``app``'s OpenAPI document hold ``models`` (and the models they nest) as
    components, for the references :func:`json_body` writes (built once, on first request).
    """
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                doc = model.model_json_schema(ref_template=_COMPONENT)
                for name, nested in doc.pop("$defs", {}).items():
                    components.setdefault(name, nested)
                components.setdefault(model.__name__, doc)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
