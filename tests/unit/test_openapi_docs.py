"""Every role's ``/docs`` lists its inference routes, though FastAPI never serves them.

The hot paths answer inference requests before FastAPI sees them; the OpenAPI
document is where users look first, so it must still describe them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI

from kubeinfer_runtime.contract import GatewaySettings, ModelServerSettings
from kubeinfer_runtime.gateway.app import create_app as create_gateway
from kubeinfer_runtime.openapi_docs import Header, Route, document_routes
from kubeinfer_runtime.server.app import create_app as create_server


def openapi(app: Any) -> dict[str, Any]:
    # The single-model server builds its FastAPI app on first use (server.control).
    inner = getattr(getattr(app, "app", None), "api", None)
    fastapi = app if isinstance(app, FastAPI) else inner if isinstance(inner, FastAPI) else next(
        v for v in vars(app).values() if isinstance(v, FastAPI))
    doc: dict[str, Any] = fastapi.openapi()
    return doc


def test_model_server_documents_invocations_and_v2_infer() -> None:
    doc = openapi(create_server(ModelServerSettings(model_uri="file:///m.onnx")))
    op = doc["paths"]["/invocations"]["post"]
    assert set(op["requestBody"]["content"]) == {"application/json", "text/csv",
                                                  "application/x-npy", "application/x-npz"}
    assert {p["name"] for p in op["parameters"]} == {"Content-Type", "Accept",
                                                     "X-Amzn-SageMaker-Custom-Attributes"}
    assert {"200", "400", "413", "424", "503"} <= set(op["responses"])
    v2 = doc["paths"]["/v2/models/{name}/infer"]["post"]
    assert v2["parameters"][0] == {"name": "name", "in": "path", "required": True,
                                   "schema": {"type": "string"}}
    # The binary data extension: a JSON header, then raw tensors.
    assert "application/octet-stream" in v2["requestBody"]["content"]
    assert "Inference-Header-Content-Length" in v2["description"]
    assert "/ping" in doc["paths"]  # FastAPI's own routes are still there


def test_gateway_documents_the_sagemaker_runtime_api(tmp_path: Path) -> None:
    doc = openapi(create_gateway(GatewaySettings(route_table_path=str(tmp_path / "r.json"))))
    sync = doc["paths"]["/endpoints/{name}/invocations"]["post"]
    assert "X-Amzn-SageMaker-Target-Variant" in {p["name"] for p in sync["parameters"]}
    asynchronous = doc["paths"]["/endpoints/{name}/async-invocations"]["post"]
    assert "202" in asynchronous["responses"]
    [required] = [p for p in asynchronous["parameters"] if p.get("required")
                  and p["in"] == "header"]
    assert required["name"] == "X-Amzn-SageMaker-InputLocation"


def test_multi_model_server_documents_target_model(tmp_path: Path) -> None:
    app = create_server(ModelServerSettings(multi_model_prefix=f"file://{tmp_path}/",
                                            model_cache_dir=str(tmp_path / "cache")))
    doc = openapi(app)
    [target] = [p for p in doc["paths"]["/invocations"]["post"]["parameters"]
                if p.get("required")]
    assert target["name"] == "X-Amzn-SageMaker-Target-Model"
    assert "/models/{name}/invoke" in doc["paths"]


def test_documented_routes_are_added_once_and_kept() -> None:
    app = FastAPI()
    document_routes(app, [Route("/x/{id}", "X", headers=(Header("H", "h"),))])
    first = app.openapi()
    assert app.openapi() is first
    op = first["paths"]["/x/{id}"]["post"]
    assert [p["name"] for p in op["parameters"]] == ["id", "H"]
    assert op["operationId"] == "post_x__id"
