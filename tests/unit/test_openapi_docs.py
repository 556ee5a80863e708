"""Every role's ``/docs`` lists its inference routes, though FastAPI never serves them,
and the bodies of the routes that read them by hand.

The hot paths answer inference requests before FastAPI sees them; the OpenAPI
document is where users look first, so it must still describe them.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from kubeinfer_runtime.contract import GatewaySettings, ModelServerSettings
from kubeinfer_runtime.contract.edge import FleetServerSettings
from kubeinfer_runtime.edge.server import create_app as create_fleet_server
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


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_fleet_server_documents_the_device_api_bodies(tmp_path: Path) -> None:
    # The device API reads its bodies by hand (bounded, refusals worded): FastAPI would
    # document none of them; a device vendor writing an agent needs their schemas.
    config = tmp_path / "fleet.json"
    config.write_text(json.dumps({"name": "f", "current": {"version": "v1", "packages": {}},
                                  "publicKey": base64.b64encode(bytes(32)).decode()}))
    app = create_fleet_server(FleetServerSettings(
        fleet_config_file=str(config), redis_url="redis://127.0.0.1:1/0",
        bootstrap_token="b" * 24))
    doc = openapi(app)
    schemas = doc["components"]["schemas"]
    bodies = {path: doc["paths"][path]["post"]["requestBody"] for path in (
        "/v1/register", "/v1/devices/{device_id}/heartbeat", "/v1/devices/{device_id}/captures")}
    assert bodies["/v1/register"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/RegisterRequest"}
    assert {"deviceId", "target", "labels"} <= set(schemas["RegisterRequest"]["properties"])
    assert bodies["/v1/devices/{device_id}/heartbeat"]["content"]["application/json"][
        "schema"] == {"$ref": "#/components/schemas/Heartbeat"}
    assert {"version", "lastDeployment", "updatingTo"} <= set(
        schemas["Heartbeat"]["properties"])
    assert "JSON Lines" in bodies["/v1/devices/{device_id}/captures"]["description"]
    assert set(bodies["/v1/devices/{device_id}/captures"]["content"]) == {"application/jsonl"}
    # Every reference in the document names a schema it holds (nested models included).
    refs = _refs(doc)
    assert refs and all(r.removeprefix("#/components/schemas/") in schemas for r in refs), \
        sorted(set(refs) - {f"#/components/schemas/{n}" for n in schemas})
    assert app.openapi() is doc  # built once
