"""What the operator renders for security: secrets only through Secrets, the runtime Secret,
caller-credential volumes, NetworkPolicies. Every manifest is checked with
kubernetes-validate (strict) and searched for the test's secret strings."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from pydantic import SecretStr

from kubeinfer_operator.api.endpoint import Endpoint
from kubeinfer_operator.render import k8s_secrets as secrets
from kubeinfer_operator.render import redis_users
from kubeinfer_operator.render.k8s import Owner, render_endpoint, route_table
from kubeinfer_operator.render.plan import plan_endpoint
from kubeinfer_operator.settings import OperatorSettings
from kubeinfer_runtime.contract import RouteTable
from kubeinfer_runtime.contract.auth import CREDENTIALS_MOUNT, AuthMode

REPO = Path(__file__).resolve().parents[2]
#: The Endpoint examples (the TransformJob ones are rendered in test_transform_render.py).
EXAMPLES = sorted(p for p in (REPO / "examples").glob("*.yaml")
                  if "kind: Endpoint" in p.read_text())
PASSWORD = "redis-pass-7d3f1b2e9c"
SECRET_KEY = "caller-secret-58a1c3"
TOKEN = "caller-token-0f9e8d"
SIGNING = "scaler-signing-key-4c4c"
SECRETS = (PASSWORD, SECRET_KEY, TOKEN, SIGNING)

SETTINGS = OperatorSettings(
    redis_url=f"redis://:{PASSWORD}@redis.infra:6379/0",
    caller_access_key_id="AKIAKUBEINFERTEST01", caller_secret_access_key=SECRET_KEY,
    caller_token=TOKEN, scaler_signing_key=SIGNING, scaler_port=8090,
    scaler_url="http://kubeinfer-scaler.kubeinfer-system.svc:8090/scale",
    default_auth_mode=AuthMode.SIGV4, network_policy=True, s3_secret_name="s3-creds")


def _doc(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(path.read_text())
    return doc


def _render(doc: dict[str, Any], settings: OperatorSettings = SETTINGS,
            namespace: str = "ml") -> dict[tuple[str, str], Any]:
    owner = Owner(doc["metadata"]["name"], namespace, "0b6c2a3e-1111-4222-8333-944455556666")
    plan = plan_endpoint(Endpoint.model_validate(doc), generation=1)
    variants = [v.name for v in plan.variants]
    return {(m["kind"], m["metadata"]["name"]): m
            for m in render_endpoint(plan, owner, settings, variants)}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_no_rendered_child_carries_a_secret(path: Path) -> None:
    for manifest in _render(_doc(path)).values():
        text = json.dumps(manifest)
        for secret in SECRETS:
            assert secret not in text, (manifest["kind"], manifest["metadata"]["name"])
        kubernetes_validate.validate(manifest, "1.33.0", strict=True)
        for container in ((manifest.get("spec") or {}).get("template") or {}).get(
                "spec", {}).get("containers", []):
            for env in container.get("env", []):
                # Literal values only for what is not secret; Redis and tokens by reference.
                assert env["name"] not in ("KUBEINFER_REDIS_URL", "KUBEINFER_SCALER_TOKEN") or (
                    "valueFrom" in env), env


def test_the_runtime_secret_holds_them_and_only_there() -> None:
    owner = secrets.shared_owner_reference("iris", "uid-1")
    manifest = secrets.runtime_secret("ml", SETTINGS, [owner])
    kubernetes_validate.validate(manifest, "1.33.0", strict=True)
    data = {k: base64.b64decode(v).decode() for k, v in manifest["data"].items()}
    # The namespace's own Redis user and caller credentials, derived: never the
    # operator's password or the chart's keys themselves.
    assert data["redis-url"] == redis_users.namespace_url(
        f"redis://:{PASSWORD}@redis.infra:6379/0", "ml")
    assert (data["AWS_ACCESS_KEY_ID"], data["AWS_SECRET_ACCESS_KEY"]) == (
        secrets.caller_key_pair(SECRET_KEY, "ml"))
    assert data["token"] == secrets.caller_token(TOKEN, "ml")
    assert data["scaler-token"] == secrets.scaler_token(SIGNING.encode(), "ml")
    for value in SECRETS:  # only values derived from them
        assert value not in json.dumps(manifest)
    other = {k: base64.b64decode(v).decode()
             for k, v in secrets.runtime_secret("team-b", SETTINGS, [owner])["data"].items()}
    assert all(other[k] != data[k] for k in data), "a namespace's values open another's"
    assert manifest["metadata"]["name"] == "kubeinfer-runtime"
    assert owner["controller"] is False  # shared by the namespace's Endpoints


def test_scaler_tokens_are_per_namespace_and_unguessable_without_the_key() -> None:
    a = secrets.scaler_token(b"key-1", "team-a")
    assert a != secrets.scaler_token(b"key-1", "team-b")
    assert a != secrets.scaler_token(b"key-2", "team-a")
    assert len(a) == 64


def test_owners_accumulate_once() -> None:
    one = secrets.shared_owner_reference("a", "u1")
    two = secrets.shared_owner_reference("b", "u2")
    assert secrets.merged_owners([one], two) == [one, two]
    assert secrets.merged_owners([one, two], one) == [one, two]


def _gateway(out: dict[tuple[str, str], Any], name: str) -> tuple[dict[str, Any], Any]:
    pod = out[("Deployment", f"{name}-gateway")]["spec"]["template"]["spec"]
    return pod, pod["containers"][0]


def test_default_auth_mounts_the_generated_keys_from_the_runtime_secret() -> None:
    doc = _doc(REPO / "examples" / "realtime-endpoint.yaml")
    out = _render(doc)
    pod, container = _gateway(out, "iris")
    volume = next(v for v in pod["volumes"] if v["name"] == secrets.AUTH_VOLUME)
    assert volume["secret"]["secretName"] == "kubeinfer-runtime"
    assert volume["secret"]["optional"] is True  # missing keys: refuse requests, not crash
    assert [i["key"] for i in volume["secret"]["items"]] == list(secrets.DEFAULT_CALLER_KEYS)
    assert {"name": secrets.AUTH_VOLUME, "mountPath": CREDENTIALS_MOUNT,
            "readOnly": True} in container["volumeMounts"]
    table = RouteTable.from_json(out[("ConfigMap", "iris-routes")]["data"]["routes.json"])
    auth = table.endpoints["iris"].auth
    assert auth is not None and auth.mode is AuthMode.SIGV4
    assert auth.credentials_dir == CREDENTIALS_MOUNT


def test_an_endpoint_may_name_its_own_secret_or_turn_auth_off() -> None:
    doc = _doc(REPO / "examples" / "realtime-endpoint.yaml")
    doc["spec"]["auth"] = {"mode": "Token", "secretName": "iris-callers"}
    pod, _ = _gateway(_render(doc), "iris")
    volume = next(v for v in pod["volumes"] if v["name"] == secrets.AUTH_VOLUME)
    assert volume["secret"]["secretName"] == "iris-callers"
    assert "items" not in volume["secret"]
    doc["spec"]["auth"] = {"mode": "None"}
    out = _render(doc)
    pod, _ = _gateway(out, "iris")
    assert all(v["name"] != secrets.AUTH_VOLUME for v in pod["volumes"])
    plan = plan_endpoint(Endpoint.model_validate(doc))
    owner = Owner("iris", "ml", "u")
    assert route_table(plan, owner, SETTINGS, ["primary"]).endpoints["iris"].auth is None


def test_model_servers_accept_only_their_gateway_and_scrapers() -> None:
    settings = SETTINGS.model_copy(update={"metrics_from": [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]})
    out = _render(_doc(REPO / "examples" / "realtime-endpoint.yaml"), settings)
    policy = out[("NetworkPolicy", "iris-model-servers")]
    kubernetes_validate.validate(policy, "1.33.0", strict=True)
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"] == {"kubeinfer.io/endpoint": "iris",
                                                  "app.kubernetes.io/component": "model-server"}
    assert spec["policyTypes"] == ["Ingress"]
    inference, metrics = spec["ingress"]
    assert inference["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert inference["from"] == [{"podSelector": {"matchLabels": {
        "kubeinfer.io/endpoint": "iris", "app.kubernetes.io/component": "gateway"}}}]
    assert metrics["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert metrics["from"] == settings.metrics_from
    # Every model-server pod carries the labels the policy selects.
    for (kind, _), m in out.items():
        if kind == "Deployment" and m["metadata"]["labels"][
                "app.kubernetes.io/component"] == "model-server":
            labels = m["spec"]["template"]["metadata"]["labels"]
            assert spec["podSelector"]["matchLabels"].items() <= labels.items()


def test_no_policy_unless_enabled() -> None:
    out = _render(_doc(REPO / "examples" / "realtime-endpoint.yaml"),
                  SETTINGS.model_copy(update={"network_policy": False}))
    assert not [k for k in out if k[0] == "NetworkPolicy"]


def test_pods_roll_when_the_secret_values_they_read_as_env_change() -> None:
    doc = _doc(REPO / "examples" / "async-endpoint.yaml")

    def hashes(settings: OperatorSettings) -> tuple[str, str]:
        out = _render(doc, settings)
        gateway = out[("Deployment", "iris-async-gateway")]
        worker = out[("Deployment", "iris-async-main")]
        return tuple(d["spec"]["template"]["metadata"]["annotations"][
            "kubeinfer.io/runtime-secret-hash"] for d in (gateway, worker))  # type: ignore[return-value]

    before = hashes(SETTINGS)
    rotated = hashes(SETTINGS.model_copy(update={"redis_url": "redis://:new@r:6379/0"}))
    assert rotated[0] != before[0] and rotated[1] != before[1]
    new_key = hashes(SETTINGS.model_copy(update={"scaler_signing_key": SecretStr("other")}))
    assert new_key[0] != before[0] and new_key[1] == before[1]  # workers hold no token
    assert PASSWORD not in json.dumps(before)
