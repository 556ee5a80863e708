"""Local mode's Secrets: folders under ``$KUBEINFER_HOME/secrets/<name>/``, one file per key.

On a laptop there is no Secret API, so an Endpoint's ``auth.secretName`` names a
folder with the layout a mounted Secret has in a pod (one file per key,
readable by the user only); the gateway reads it exactly as it reads a
mounted Secret on a cluster. ``kubeinfer secret create`` writes one, like
``kubectl create secret generic``. Local mode's default is no authentication
(the gateway listens on 127.0.0.1), and ``kubeinfer up`` says so.
"""

from __future__ import annotations

import configparser
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kubeinfer_operator.api.endpoint import AuthConfig
from kubeinfer_operator.local.paths import secret_dir
from kubeinfer_runtime.contract.auth import AuthMode, AuthRoute

#: A Secret key as Kubernetes allows it.
_KEY = re.compile(r"^[-._a-zA-Z0-9]{1,253}$")


class LocalAuthError(Exception):
    """The Endpoint's auth cannot be set up locally; the message says how to fix it."""


def resolve_auth(endpoint: str, spec: AuthConfig | None,
                 home: Path | None = None) -> AuthRoute | None:
    """The gateway's AuthRoute for ``spec`` in local mode (None: no authentication)."""
    if spec is None or spec.mode in (None, AuthMode.NONE):
        return None
    assert spec.mode is not None
    if spec.secretName is None:
        raise LocalAuthError(
            f"Endpoint {endpoint}: auth.mode {spec.mode.value} needs auth.secretName in local "
            "mode (there are no generated keys on a laptop): create the credentials with "
            "kubeinfer secret create NAME --from-literal AWS_ACCESS_KEY_ID=... "
            "--from-literal AWS_SECRET_ACCESS_KEY=... (or --from-literal token=...) and set "
            "auth.secretName: NAME")
    folder = secret_dir(spec.secretName, home)
    if not folder.is_dir():
        raise LocalAuthError(
            f"Endpoint {endpoint}: auth.secretName {spec.secretName!r} does not exist "
            f"locally ({folder}): create it with kubeinfer secret create {spec.secretName} "
            "--from-literal KEY=VALUE ...")
    return AuthRoute(mode=spec.mode, credentials_dir=str(folder), regions=list(spec.regions))


def create_secret(name: str, entries: Mapping[str, bytes], home: Path | None = None) -> Path:
    """Write Secret ``name`` (replacing it), each key a file readable by the user only.

    Written to a new folder and swapped in, so a gateway never reads half of it.
    """
    if not entries:
        raise ValueError("a Secret needs at least one key: pass --from-literal KEY=VALUE")
    for key in entries:
        if not _KEY.fullmatch(key) or key.startswith("."):
            raise ValueError(f"Secret key {key!r} is not valid: use letters, digits, '-', "
                             "'_' and '.', not starting with '.'")
    folder = secret_dir(name, home)
    folder.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder.parent, 0o700)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{name}-"))
    for key, value in entries.items():
        fd = os.open(staging / key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(value)
    old = None
    if folder.exists():
        old = folder.with_name(f".{name}-old-{os.getpid()}")
        folder.rename(old)
    staging.rename(folder)
    if old is not None:
        for child in old.iterdir():
            child.unlink()
        old.rmdir()
    return folder


def _first_key_pair(folder: Path) -> tuple[str, str] | None:
    pair = [folder / "AWS_ACCESS_KEY_ID", folder / "AWS_SECRET_ACCESS_KEY"]
    if all(p.is_file() for p in pair):
        return pair[0].read_text().strip(), pair[1].read_text().strip()
    shared = folder / "credentials"
    if shared.is_file():
        parser = configparser.ConfigParser()
        parser.read_string(shared.read_text())
        for section in parser.sections():
            key = parser.get(section, "aws_access_key_id", fallback="").strip()
            secret = parser.get(section, "aws_secret_access_key", fallback="").strip()
            if key and secret:
                return key, secret
    return None


def _first_token(folder: Path) -> str | None:
    if (folder / "token").is_file():
        return (folder / "token").read_text().strip() or None
    if (folder / "tokens").is_file():
        for line in (folder / "tokens").read_text().splitlines():
            if line.strip() and not line.strip().startswith("#"):
                return line.strip()
    return None


def caller_headers(spec: AuthConfig | None, method: str, url: str, body: bytes,
                   headers: dict[str, str], home: Path | None = None) -> dict[str, str]:
    """``headers`` plus what the endpoint's ``auth`` asks of a caller, from its local Secret:
    a SigV4 signature (as boto3 makes it) or a bearer token. ``kubeinfer invoke`` uses it,
    so a local endpoint that requires credentials stays one command away."""
    if spec is None or spec.mode in (None, AuthMode.NONE) or spec.secretName is None:
        return headers
    folder = secret_dir(spec.secretName, home)
    if spec.mode is AuthMode.TOKEN:
        token = _first_token(folder)
        if token is None:
            raise LocalAuthError(f"Local Secret {spec.secretName} ({folder}) holds no token: "
                                 "add one with kubeinfer secret create")
        return {**headers, "Authorization": f"Bearer {token}"}
    pair = _first_key_pair(folder)
    if pair is None:
        raise LocalAuthError(f"Local Secret {spec.secretName} ({folder}) holds no key pair: "
                             "add AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    from botocore.auth import SigV4Auth  # type: ignore[import-untyped]
    from botocore.awsrequest import AWSRequest  # type: ignore[import-untyped]
    from botocore.credentials import Credentials  # type: ignore[import-untyped]

    request: Any = AWSRequest(method=method, url=url, data=body, headers=headers)
    region = spec.regions[0] if spec.regions else "us-east-1"
    SigV4Auth(Credentials(*pair), "sagemaker", region).add_auth(request)
    return dict(request.headers.items())
