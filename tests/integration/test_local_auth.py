"""Local mode with caller authentication: `kubeinfer secret create`, an Endpoint naming it,
boto3 with and without the keys; `up` says when callers are not authenticated."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from tests.integration.test_local import BODY, Local, local

__all__ = ["local"]

AK, SK = "AKIALOCALTEST00001", "local-secret-key-for-the-test-0123"


def client(url: str, key: str, secret: str) -> Any:
    return boto3.client("sagemaker-runtime", endpoint_url=url, region_name="us-east-1",
                        aws_access_key_id=key, aws_secret_access_key=secret,
                        config=Config(retries={"total_max_attempts": 1, "mode": "standard"}))


def manifest(model: Path, auth: str) -> str:
    return (f"apiVersion: kubeinfer.io/v1alpha1\nkind: Endpoint\nmetadata:\n  name: guarded\n"
            f"spec:\n{auth}  variants:\n    - name: main\n      model:\n"
            f"        uri: file://{model}\n")


def test_a_local_endpoint_can_require_sigv4(local: Local, models_dir: Path) -> None:
    created = local.run("secret", "create", "callers", "--from-literal",
                        f"AWS_ACCESS_KEY_ID={AK}", "--from-literal",
                        f"AWS_SECRET_ACCESS_KEY={SK}")
    assert created.returncode == 0, created.stderr
    folder = local.home / "secrets" / "callers"
    assert sorted(p.name for p in folder.iterdir()) == ["AWS_ACCESS_KEY_ID",
                                                        "AWS_SECRET_ACCESS_KEY"]
    assert folder.stat().st_mode & 0o077 == 0  # the user's only
    path = local.write("guarded.yaml", manifest(models_dir / "iris.onnx",
                                                "  auth:\n    mode: SigV4\n"
                                                "    secretName: callers\n"))
    up = local.run("up", "-d", "-f", str(path))
    assert up.returncode == 0, up.stdout + up.stderr
    assert "not authenticated" not in up.stdout
    url = local.endpoint("guarded")["url"]
    r = client(url, AK, SK).invoke_endpoint(EndpointName="guarded",
                                            ContentType="application/json", Body=BODY)
    assert json.loads(r["Body"].read())["predictions"]["label"] == [0]
    with pytest.raises(ClientError) as info:
        client(url, AK, "wrong").invoke_endpoint(EndpointName="guarded",
                                                 ContentType="application/json", Body=BODY)
    assert info.value.response["Error"]["Code"] == "InvalidSignatureException"
    routes = (local.home / "local" / "guarded" / "routes.json").read_text()
    assert SK not in routes and str(folder) in routes
    # kubeinfer invoke signs with the endpoint's local Secret.
    invoked = local.run("invoke", "guarded", "--body", BODY)
    assert invoked.returncode == 0, invoked.stderr
    assert json.loads(invoked.stdout)["predictions"]["label"] == [0]


def test_up_says_when_callers_are_not_authenticated(local: Local, models_dir: Path) -> None:
    path = local.write("open.yaml", manifest(models_dir / "iris.onnx", ""))
    up = local.run("up", "-d", "-f", str(path))
    assert up.returncode == 0, up.stdout + up.stderr
    assert "callers are not authenticated" in up.stdout


def test_a_missing_local_secret_fails_the_apply_with_the_fix(local: Local,
                                                             models_dir: Path) -> None:
    path = local.write("nokeys.yaml", manifest(models_dir / "iris.onnx",
                                               "  auth:\n    mode: Token\n"
                                               "    secretName: nope\n"))
    up = local.run("up", "-d", "-f", str(path), "--timeout", "30")
    assert up.returncode == 1
    assert "kubeinfer secret create nope" in up.stdout + up.stderr
