"""Local mode's Secrets: written by `kubeinfer secret create`, resolved into the gateway's
AuthRoute, and used by `kubeinfer invoke` to sign: checked against the gateway's verifier."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import pytest

from kubeinfer_operator.api.endpoint import AuthConfig
from kubeinfer_operator.local.credentials import (
    LocalAuthError,
    caller_headers,
    create_secret,
    resolve_auth,
)
from kubeinfer_runtime.contract.auth import AuthMode
from kubeinfer_runtime.gateway.auth import Authenticator
from kubeinfer_runtime.gateway.credentials import load_credentials

URL = "http://127.0.0.1:8080/endpoints/iris/invocations"


def _check(spec: AuthConfig, home: Path, headers: dict[str, str], body: bytes) -> object:
    route = resolve_auth("iris", spec, home)
    assert route is not None and route.credentials_dir is not None
    creds = load_credentials(Path(route.credentials_dir))
    auth = Authenticator(route.mode, lambda: creds, regions=frozenset(route.regions) or None)
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    raw.append((b"host", urlsplit(URL).netloc.encode()))
    return auth.check(b"POST", urlsplit(URL).path.encode(), raw, body)


def test_a_signed_invoke_verifies_at_the_gateway(tmp_path: Path) -> None:
    create_secret("keys", {"AWS_ACCESS_KEY_ID": b"AKIALOCAL0001",
                           "AWS_SECRET_ACCESS_KEY": b"s3cr3t-local"}, tmp_path)
    spec = AuthConfig(mode=AuthMode.SIGV4, secretName="keys", regions=["eu-west-1"])
    body = b'{"instances": [[1, 2, 3, 4]]}'
    headers = caller_headers(spec, "POST", URL, body, {"Content-Type": "application/json"},
                             tmp_path)
    assert "Credential=AKIALOCAL0001/" in headers["Authorization"]
    assert "/eu-west-1/sagemaker/" in headers["Authorization"]
    assert _check(spec, tmp_path, headers, body) is None
    assert _check(spec, tmp_path, headers, body + b" ") is not None  # the body is signed


def test_tokens_and_missing_secrets(tmp_path: Path) -> None:
    create_secret("tok", {"tokens": b"# comment\ntok-123\n"}, tmp_path)
    spec = AuthConfig(mode=AuthMode.TOKEN, secretName="tok")
    headers = caller_headers(spec, "POST", URL, b"", {}, tmp_path)
    assert headers == {"Authorization": "Bearer tok-123"}
    assert _check(spec, tmp_path, headers, b"") is None
    with pytest.raises(LocalAuthError, match="kubeinfer secret create gone"):
        resolve_auth("iris", AuthConfig(mode=AuthMode.TOKEN, secretName="gone"), tmp_path)
    with pytest.raises(LocalAuthError, match=r"needs auth\.secretName"):
        resolve_auth("iris", AuthConfig(mode=AuthMode.SIGV4), tmp_path)
    assert resolve_auth("iris", None, tmp_path) is None


def test_create_secret_replaces_the_folder_and_refuses_bad_keys(tmp_path: Path) -> None:
    folder = create_secret("s", {"a": b"1", "b": b"2"}, tmp_path)
    create_secret("s", {"c": b"3"}, tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["c"]
    assert folder.stat().st_mode & 0o777 == 0o700
    assert (folder / "c").stat().st_mode & 0o777 == 0o600
    for bad in ("../x", ".hidden", "a/b", ""):
        with pytest.raises(ValueError):
            create_secret("s", {bad: b"x"}, tmp_path)
    with pytest.raises(ValueError):
        create_secret("../escape", {"a": b"x"}, tmp_path)
