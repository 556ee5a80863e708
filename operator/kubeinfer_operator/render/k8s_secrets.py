"""Credentials on Kubernetes: the per-namespace runtime Secret and how pods read it: PURE.

Runtime pods need three secrets: the async queue's Redis URL (its password),
the token a gateway presents to the operator's scaler, and, for gateways of
Endpoints that name no Secret of their own, the default caller credentials
the chart generated. Pods can only read Secrets of their own namespace, so the
operator keeps one Secret, ``kubeinfer-runtime`` (``settings.runtime_secret_name``),
in every namespace that has Endpoints, owned by those Endpoints (the garbage
collector removes it with the last of them). Pods read it with ``secretKeyRef``
and a Secret volume: no secret is ever a literal env value, a ConfigMap entry
or part of the route table.

Scaler tokens are derived, not stored: ``HMAC-SHA256(signing key, namespace)``,
so the scaler verifies a token without state, any operator replica can, and a
token is worth exactly one namespace.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

from kubeinfer_operator.api.endpoint import AuthConfig
from kubeinfer_operator.render import k8s_meta as meta
from kubeinfer_operator.settings import OperatorSettings
from kubeinfer_runtime.contract.auth import CREDENTIALS_MOUNT, AuthMode, AuthRoute

KEY_REDIS_URL = "redis-url"
KEY_SCALER_TOKEN = "scaler-token"
KEY_ACCESS_KEY_ID = "AWS_ACCESS_KEY_ID"
KEY_SECRET_ACCESS_KEY = "AWS_SECRET_ACCESS_KEY"
KEY_TOKEN = "token"
#: The runtime Secret's keys a gateway mounts as its default caller credentials.
DEFAULT_CALLER_KEYS = (KEY_ACCESS_KEY_ID, KEY_SECRET_ACCESS_KEY, KEY_TOKEN)
COMPONENT_CREDENTIALS = "credentials"
AUTH_VOLUME = "caller-credentials"


def scaler_token(signing_key: bytes, namespace: str) -> str:
    """The token gateways of ``namespace`` present on ``POST /scale``."""
    return hmac.new(signing_key, b"kubeinfer-scaler:" + namespace.encode(),
                    hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class ResolvedAuth:
    """An Endpoint's caller authentication with the cluster default applied."""

    mode: AuthMode
    #: The user's Secret (in the Endpoint's namespace); None: the runtime Secret's
    #: default caller credentials.
    secret_name: str | None = None
    regions: tuple[str, ...] = ()

    def route(self) -> AuthRoute | None:
        if self.mode is AuthMode.NONE:
            return None
        return AuthRoute(mode=self.mode, credentials_dir=CREDENTIALS_MOUNT,
                         regions=list(self.regions))


def resolve_auth(spec: AuthConfig | None, settings: OperatorSettings) -> ResolvedAuth:
    mode = (spec.mode if spec is not None and spec.mode is not None
            else settings.default_auth_mode)
    if mode is AuthMode.NONE:
        return ResolvedAuth(AuthMode.NONE)
    return ResolvedAuth(mode, spec.secretName if spec is not None else None,
                        tuple(spec.regions) if spec is not None else ())


def signing_key(settings: OperatorSettings) -> bytes | None:
    key = settings.scaler_signing_key
    return key.get_secret_value().encode() if key is not None else None


def runtime_secret_data(namespace: str, settings: OperatorSettings) -> dict[str, str]:
    """The runtime Secret's ``data`` (base64) for ``namespace``: only what is configured."""
    plain: dict[str, str] = {}
    if settings.redis_url:
        plain[KEY_REDIS_URL] = settings.redis_url
    key = signing_key(settings)
    if settings.scaler_url and key is not None:
        plain[KEY_SCALER_TOKEN] = scaler_token(key, namespace)
    if settings.caller_access_key_id and settings.caller_secret_access_key:
        plain[KEY_ACCESS_KEY_ID] = settings.caller_access_key_id.get_secret_value()
        plain[KEY_SECRET_ACCESS_KEY] = settings.caller_secret_access_key.get_secret_value()
    if settings.caller_token:
        plain[KEY_TOKEN] = settings.caller_token.get_secret_value()
    return {k: base64.b64encode(v.encode()).decode() for k, v in sorted(plain.items())}


def shared_owner_reference(name: str, uid: str) -> dict[str, Any]:
    """An owner that is not the controller: the Secret is shared by every Endpoint of
    its namespace and goes away with the last of them."""
    return {**meta.owner_reference(name, uid), "controller": False,
            "blockOwnerDeletion": False}


def runtime_secret(namespace: str, settings: OperatorSettings,
                   owners: list[dict[str, Any]]) -> dict[str, Any]:
    """The whole runtime Secret manifest (``owners``: owner references, in order)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": settings.runtime_secret_name,
            "namespace": namespace,
            "labels": {meta.LABEL_NAME: meta.APP_NAME, meta.LABEL_PART_OF: meta.APP_NAME,
                       meta.LABEL_MANAGED_BY: meta.MANAGED_BY,
                       meta.LABEL_COMPONENT: COMPONENT_CREDENTIALS},
            "ownerReferences": owners,
        },
        "data": runtime_secret_data(namespace, settings),
    }


def merged_owners(existing: list[dict[str, Any]], owner: dict[str, Any]) -> list[dict[str, Any]]:
    """``existing`` owner references with ``owner`` added once (by uid)."""
    if any(r.get("uid") == owner["uid"] for r in existing):
        return existing
    return [*existing, owner]


def env_hash(namespace: str, settings: OperatorSettings, *, redis: bool, scaler: bool) -> str:
    """Hash of the runtime Secret values a pod reads as env (secretKeyRef): put in its
    template, it rolls the pods when one changes (env is read only at start)."""
    data = runtime_secret_data(namespace, settings)
    used = {k: v for k, v in data.items()
            if (redis and k == KEY_REDIS_URL) or (scaler and k == KEY_SCALER_TOKEN)}
    return meta.content_hash(used)


def secret_env(name: str, secret: str, key: str) -> dict[str, Any]:
    # Optional: a key not there yet (a setting turned on since) must not keep the pod
    # from starting; the feature it serves then reports itself unconfigured.
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key,
                                                         "optional": True}}}


def runtime_env(settings: OperatorSettings, *, redis: bool, scaler: bool) -> list[dict[str, Any]]:
    """Env entries of a runtime container that come from the runtime Secret."""
    out = []
    if redis and settings.redis_url:
        out.append(secret_env("KUBEINFER_REDIS_URL", settings.runtime_secret_name,
                              KEY_REDIS_URL))
    if scaler and settings.scaler_url:
        out.append(secret_env("KUBEINFER_SCALER_TOKEN", settings.runtime_secret_name,
                              KEY_SCALER_TOKEN))
    return out


def auth_volume(auth: ResolvedAuth, settings: OperatorSettings
                ) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The gateway's caller-credentials volume and mount (None when auth is off).

    Optional on purpose: a missing Secret or key must not keep the gateway from
    starting; it then refuses every request (fail closed) saying what is missing.
    """
    if auth.mode is AuthMode.NONE:
        return None
    source: dict[str, Any]
    if auth.secret_name is not None:
        source = {"secretName": auth.secret_name, "optional": True, "defaultMode": 0o440}
    else:
        source = {"secretName": settings.runtime_secret_name, "optional": True,
                  "defaultMode": 0o440,
                  "items": [{"key": k, "path": k} for k in DEFAULT_CALLER_KEYS]}
    return ({"name": AUTH_VOLUME, "secret": source},
            {"name": AUTH_VOLUME, "mountPath": CREDENTIALS_MOUNT, "readOnly": True})
