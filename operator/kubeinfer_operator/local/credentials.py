"""Local mode's Secrets: folders under ``$KUBEINFER_HOME/secrets/<name>/``, one file per key.

On a laptop there is no Secret API, so an Endpoint's ``auth.secretName`` names a
folder with the layout a mounted Secret has in a pod (one file per key,
readable by the user only); the gateway reads it exactly as it reads a
mounted Secret on a cluster. ``kubeinfer secret create`` writes one, like
``kubectl create secret generic``. Local mode's default is no authentication
(the gateway listens on 127.0.0.1), and ``kubeinfer up`` says so.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

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
