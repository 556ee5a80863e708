"""Caller authentication on a real gateway, with the clients users have: boto3's
sagemaker-runtime (invoke_endpoint, invoke_endpoint_async), the SageMaker Python SDK's
Predictor (its own virtualenv, .venv-sagemaker), and curl-style bearer tokens.

Right keys pass unchanged; wrong keys, unknown keys, expired signatures, missing and
wrong tokens are refused with the error codes AWS uses, before anything reaches a model
server or the queue. Rotating the credentials Secret takes effect without a restart.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import botocore.auth
import httpx
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from kubeinfer_runtime.contract import (
    AsyncQueueKeys,
    AsyncRoute,
    EndpointRoute,
    RouteTable,
    VariantRoute,
)
from kubeinfer_runtime.contract.auth import AuthMode, AuthRoute
from tests.support.ports import wait_until
from tests.support.procs import RuntimeProcess, start_runtime
from tests.support.redis_server import RedisServer, start_redis

REPO = Path(__file__).resolve().parents[2]
SDK_PYTHON = REPO / ".venv-sagemaker" / "bin" / "python"
AK, SK = "AKIAKUBEINFERTEST01", "kubeinfer/test/secret/key/0123456789abcdef"
AK2, SK2 = "AKIAKUBEINFERTEST02", "second-key-for-rotation-0123456789abcdefgh"
TOKEN = "tok-7c1d0a9b2e4f4c3e8d6b5a4f3e2d1c0b"
BODY = json.dumps({"instances": [[5.1, 3.5, 1.4, 0.2]]})


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gateway-auth")


def write_keys(folder: Path, **files: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    for name, value in files.items():
        (folder / name).write_text(value)


@pytest.fixture(scope="module")
def redis_server(workdir: Path) -> Iterator[RedisServer]:
    server = start_redis(workdir / "redis")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def model_server(models_dir: Path, workdir: Path) -> Iterator[RuntimeProcess]:
    proc = start_runtime("model-server", {
        "KUBEINFER_MODEL_URI": f"file://{models_dir / 'iris.onnx'}",
        "KUBEINFER_ENDPOINT_NAME": "iris", "KUBEINFER_VARIANT_NAME": "main"},
        workdir / "logs", timeout=60)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def gateway(workdir: Path, model_server: RuntimeProcess,
            redis_server: RedisServer) -> Iterator[RuntimeProcess]:
    sigv4_dir, token_dir = workdir / "keys", workdir / "tokens"
    write_keys(sigv4_dir, AWS_ACCESS_KEY_ID=AK, AWS_SECRET_ACCESS_KEY=SK)
    write_keys(token_dir, tokens=f"# one per line\n{TOKEN}\n")
    variants = [VariantRoute(name="main", weight=1.0, upstreams=[model_server.url])]
    sigv4 = AuthRoute(mode=AuthMode.SIGV4, credentials_dir=str(sigv4_dir))
    table = RouteTable(revision=1, endpoints={
        "iris": EndpointRoute(name="iris", variants=variants, auth=sigv4),
        "iris-token": EndpointRoute(name="iris-token", variants=variants, auth=AuthRoute(
            mode=AuthMode.TOKEN, credentials_dir=str(token_dir))),
        "iris-eu": EndpointRoute(name="iris-eu", variants=variants, auth=AuthRoute(
            mode=AuthMode.SIGV4, credentials_dir=str(sigv4_dir), regions=["eu-west-1"])),
        "iris-nokeys": EndpointRoute(name="iris-nokeys", variants=variants, auth=AuthRoute(
            mode=AuthMode.SIGV4, credentials_dir=str(workdir / "missing"))),
        "iris-open": EndpointRoute(name="iris-open", variants=variants),
        "iris-async": EndpointRoute(
            name="iris-async", type="Async", variants=[VariantRoute(name="main", weight=1.0)],
            auth=sigv4, async_config=AsyncRoute(
                queue="auth-async", output_path="s3://bucket/out",
                failure_path="s3://bucket/failed")),
    })
    routes = workdir / "routes.json"
    table.write_atomic(routes)
    proc = start_runtime("gateway", {"KUBEINFER_ROUTE_TABLE_PATH": str(routes),
                                     "KUBEINFER_REDIS_URL": redis_server.url},
                         workdir / "logs")
    yield proc
    proc.stop()


def client(gateway: RuntimeProcess, key: str = AK, secret: str = SK,
           region: str = "us-east-1") -> Any:
    return boto3.client("sagemaker-runtime", endpoint_url=gateway.url, region_name=region,
                        aws_access_key_id=key, aws_secret_access_key=secret,
                        config=Config(retries={"total_max_attempts": 1, "mode": "standard"}))


def refused(call: Any) -> tuple[int, str, str]:
    with pytest.raises(ClientError) as info:
        call()
    error = info.value.response
    return (error["ResponseMetadata"]["HTTPStatusCode"], error["Error"]["Code"],
            error["Error"]["Message"])


def invoke(c: Any, endpoint: str = "iris") -> dict[str, Any]:
    r = c.invoke_endpoint(EndpointName=endpoint, ContentType="application/json", Body=BODY)
    body: dict[str, Any] = json.loads(r["Body"].read())
    return body


def test_boto3_with_the_right_key_is_served_unchanged(gateway: RuntimeProcess) -> None:
    assert invoke(client(gateway))["predictions"]["label"] == [0]
    # Any region, unless the endpoint restricts it.
    assert invoke(client(gateway, region="ap-southeast-2"))["predictions"]["label"] == [0]


def test_wrong_and_unknown_keys_are_refused(gateway: RuntimeProcess) -> None:
    status, code, message = refused(lambda: invoke(client(gateway, secret="wrong-secret")))
    assert (status, code) == (403, "InvalidSignatureException")
    assert "does not match" in message and "wrong-secret" not in message
    status, code, _ = refused(lambda: invoke(client(gateway, key="AKIAUNKNOWN000000")))
    assert (status, code) == (403, "UnrecognizedClientException")


def test_an_expired_signature_is_refused(gateway: RuntimeProcess,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    real = botocore.auth.get_current_datetime
    for shift, expected in ((-6, "Signature expired"), (6, "Signature not yet current")):
        monkeypatch.setattr(botocore.auth, "get_current_datetime",
                            lambda s=shift: real() + datetime.timedelta(minutes=s))
        status, code, message = refused(lambda: invoke(client(gateway)))
        assert (status, code) == (403, "InvalidSignatureException")
        assert message.startswith(expected)
    monkeypatch.setattr(botocore.auth, "get_current_datetime",
                        lambda: real() - datetime.timedelta(minutes=4))
    assert invoke(client(gateway))["predictions"]["label"] == [0]  # inside the window


def test_unsigned_requests_and_other_regions_are_refused(gateway: RuntimeProcess) -> None:
    r = httpx.post(f"{gateway.url}/endpoints/iris/invocations", content=BODY,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 403
    assert r.headers["x-amzn-errortype"] == "MissingAuthenticationTokenException:"
    status, code, message = refused(lambda: invoke(client(gateway), "iris-eu"))
    assert (status, code) == (403, "InvalidSignatureException") and "eu-west-1" in message
    assert invoke(client(gateway, region="eu-west-1"), "iris-eu")["predictions"]


def test_missing_credentials_fail_closed(gateway: RuntimeProcess) -> None:
    status, code, _ = refused(lambda: invoke(client(gateway), "iris-nokeys"))
    assert (status, code) == (503, "ServiceUnavailable")
    assert invoke(client(gateway, secret="anything"), "iris-open")["predictions"]


def test_bearer_tokens(gateway: RuntimeProcess) -> None:
    url = f"{gateway.url}/endpoints/iris-token/invocations"
    headers = {"Content-Type": "application/json"}
    ok = httpx.post(url, content=BODY, headers={**headers, "Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200, ok.text
    missing = httpx.post(url, content=BODY, headers=headers)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    wrong = httpx.post(url, content=BODY,
                       headers={**headers, "Authorization": f"Bearer {TOKEN}x"})
    assert wrong.status_code == 403
    assert wrong.headers["x-amzn-errortype"] == "AccessDeniedException:"
    assert TOKEN not in wrong.text
    # A SigV4 signature is no token.
    status, code, _ = refused(lambda: invoke(client(gateway), "iris-token"))
    assert status in (400, 401, 403) and code


def test_invoke_endpoint_async_is_authenticated_before_queueing(
        gateway: RuntimeProcess, redis_server: RedisServer) -> None:
    keys = AsyncQueueKeys(queue="auth-async")
    r = redis_server.client()
    before = r.xlen(keys.stream) if r.exists(keys.stream) else 0
    status, code, _ = refused(lambda: client(gateway, secret="wrong").invoke_endpoint_async(
        EndpointName="iris-async", InputLocation="s3://bucket/in/x.json"))
    assert (status, code) == (403, "InvalidSignatureException")
    assert (r.xlen(keys.stream) if r.exists(keys.stream) else 0) == before
    accepted = client(gateway).invoke_endpoint_async(EndpointName="iris-async",
                                                     InputLocation="s3://bucket/in/x.json")
    assert accepted["ResponseMetadata"]["HTTPStatusCode"] == 202
    assert r.xlen(keys.stream) == before + 1


def test_rotating_the_secret_applies_without_a_restart(gateway: RuntimeProcess,
                                                       workdir: Path) -> None:
    folder = workdir / "keys"
    write_keys(folder, credentials=(f"[old]\naws_access_key_id = {AK}\n"
                                    f"aws_secret_access_key = {SK}\n"
                                    f"[new]\naws_access_key_id = {AK2}\n"
                                    f"aws_secret_access_key = {SK2}\n"))

    def new_key_works() -> bool:
        try:
            return bool(invoke(client(gateway, AK2, SK2))["predictions"])
        except ClientError:
            return False

    wait_until(new_key_works, 10, "the rotated key to be accepted", interval=0.2)
    assert invoke(client(gateway))["predictions"]  # both keys during the rotation
    write_keys(folder, AWS_ACCESS_KEY_ID=AK, AWS_SECRET_ACCESS_KEY=SK)
    wait_until(lambda: not new_key_works(), 10, "the retired key to be refused", interval=0.2)


SDK_SCRIPT = """
import json, sys
import boto3, sagemaker
from sagemaker.deserializers import JSONDeserializer
from sagemaker.predictor import Predictor
from sagemaker.serializers import JSONSerializer

url, key, secret = sys.argv[1:4]
boto_session = boto3.Session(aws_access_key_id=key, aws_secret_access_key=secret,
                             region_name="us-east-1")
runtime = boto_session.client("sagemaker-runtime", endpoint_url=url)
session = sagemaker.Session(boto_session=boto_session, sagemaker_runtime_client=runtime,
                            sagemaker_client=boto_session.client("sagemaker"))
predictor = Predictor("iris", sagemaker_session=session, serializer=JSONSerializer(),
                      deserializer=JSONDeserializer())
try:
    print(json.dumps({"ok": predictor.predict({"instances": [[5.1, 3.5, 1.4, 0.2]]})}))
except Exception as exc:
    print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
"""


def _sdk(gateway: RuntimeProcess, key: str, secret: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["SAGEMAKER_SUPPRESS_V2_WARNING"] = "1"
    result = subprocess.run([str(SDK_PYTHON), "-c", SDK_SCRIPT, gateway.url, key, secret],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    doc: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return doc


@pytest.mark.skipif(not SDK_PYTHON.exists() and not os.environ.get("CI"),
                    reason="run scripts/setup test to create .venv-sagemaker")
def test_the_sagemaker_sdk_predictor_both_ways(gateway: RuntimeProcess) -> None:
    assert SDK_PYTHON.exists(), "scripts/setup test creates .venv-sagemaker"
    ok = _sdk(gateway, AK, SK)
    assert ok["ok"]["predictions"]["label"] == [0], ok
    bad = _sdk(gateway, AK, "wrong")
    assert bad["error"] == "ClientError" and "InvalidSignatureException" in bad["message"]


def test_the_routes_page_names_no_secret(gateway: RuntimeProcess) -> None:
    text = httpx.get(f"{gateway.url}/routes").text
    assert '"auth"' in text  # the page describes the auth in force ...
    for secret in (SK, SK2, TOKEN):  # ... and never the credentials
        assert secret not in text
