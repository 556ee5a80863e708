"""A small async Kubernetes API client for the operator's own reads and writes.

Why not the ``kubernetes`` package: its client is synchronous (one thread per
call) and kopf already holds the credentials. This client uses aiohttp with
the ``kopf.ConnectionInfo`` from the login handler (``k8s.login``), speaks
plain JSON dicts, and turns HTTP failures into the operator's error kinds:

* 404 → ``None`` / ``False`` (absent is an answer, not an error)
* 409 on create → ``AlreadyExists`` (the caller decides: adopt or conflict)
* 422 → ``Rejected`` (the API refused a manifest: retrying cannot help)
* anything else, and network errors → ``KubeApiError`` (a ``ClusterError``:
  transient, retried with backoff)
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import kopf

from kubeinfer_operator.errors import ClusterError, KubeinferError, SpecError
from kubeinfer_operator.k8s.kinds import Kind, kind_of

MERGE_PATCH = "application/merge-patch+json"


class KubeApiError(ClusterError):
    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class AlreadyExists(KubeinferError):
    """Create found an object with that name (ours from a race, or someone else's)."""


class Rejected(SpecError):
    """The API server refused a manifest as invalid (HTTP 422)."""

    reason = "RejectedByAPI"


def _api_message(body: Any, text: str) -> str:
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])
    return text.strip()[:300] or "(no message)"


class KubeClient:
    """JSON-over-HTTP access to the few resources the operator manages."""

    def __init__(self, *, timeout_s: float = 30.0) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._info: kopf.ConnectionInfo | None = None
        self._session: aiohttp.ClientSession | None = None
        self._session_info: kopf.ConnectionInfo | None = None

    def use(self, info: kopf.ConnectionInfo) -> None:
        """Take (new) credentials; the next request reconnects with them."""
        self._info = info

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _http(self) -> aiohttp.ClientSession:
        if self._info is None:
            raise KubeApiError("Not logged in to the Kubernetes API yet; the operator's login "
                               "handler must run first")
        if self._session is None or self._session_info is not self._info:
            await self.close()
            info = self._info
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=info.as_ssl_context()),
                headers={**info.as_http_headers(), "Accept": "application/json",
                         "User-Agent": "kubeinfer-operator"},
                timeout=self._timeout,
                trust_env=info.trust_env,
            )
            self._session_info = info
        return self._session

    async def _call(self, method: str, path: str, *, params: dict[str, str] | None = None,
                    body: Any = None, content_type: str = "application/json",
                    ) -> tuple[int, Any]:
        session = await self._http()
        assert self._info is not None  # set by _http()
        url = self._info.server.rstrip("/") + path
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type} if data is not None else {}
        try:
            async with session.request(method, url, params=params, data=data,
                                       headers=headers) as resp:
                text = await resp.text()
                status = resp.status
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise KubeApiError(f"Kubernetes API unreachable on {method} {path}: "
                               f"{exc or type(exc).__name__}; retrying") from exc
        try:
            parsed = json.loads(text) if text else None
        except ValueError:
            parsed = None
        if status < 400 or status == 404:
            return status, parsed
        message = _api_message(parsed, text)
        if status == 409 and method == "POST":
            raise AlreadyExists(message)
        if status == 422:
            raise Rejected(f"Kubernetes API rejected {method} {path}: {message}")
        if status in (401, 403):
            raise KubeApiError(f"Kubernetes API refused {method} {path} ({status}): {message}; "
                               "grant the operator's ServiceAccount the RBAC listed in "
                               "kubeinfer_operator.k8s", status)
        raise KubeApiError(f"Kubernetes API failed {method} {path} ({status}): {message}",
                           status)

    async def get(self, kind: Kind, namespace: str, name: str) -> dict[str, Any] | None:
        status, body = await self._call("GET", kind.path(namespace, name))
        return None if status == 404 else _with_kind(body, kind)

    async def get_path(self, path: str) -> dict[str, Any] | None:
        """GET an object by its API path (kinds this module has no ``Kind`` for, such as
        kopf's cluster-scoped peering object); None when it does not exist."""
        status, body = await self._call("GET", path)
        return body if status != 404 and isinstance(body, dict) else None

    async def list(self, kind: Kind, namespace: str,
                   label_selector: str | None = None) -> list[dict[str, Any]]:
        params = {"labelSelector": label_selector} if label_selector else None
        status, body = await self._call("GET", kind.path(namespace), params=params)
        if status == 404 or not isinstance(body, dict):
            return []
        # List items carry no apiVersion/kind on a real API server: restore them.
        return [_with_kind(item, kind) for item in body.get("items") or []]

    async def create(self, manifest: dict[str, Any]) -> dict[str, Any]:
        kind = kind_of(manifest)
        namespace = str(manifest["metadata"]["namespace"])
        _, body = await self._call("POST", kind.path(namespace), body=manifest)
        return _with_kind(body, kind)

    async def merge_patch(self, kind: Kind, namespace: str, name: str, patch: dict[str, Any],
                          subresource: str | None = None) -> dict[str, Any] | None:
        status, body = await self._call("PATCH", kind.path(namespace, name, subresource),
                                        body=patch, content_type=MERGE_PATCH)
        return None if status == 404 else _with_kind(body, kind)

    async def delete(self, kind: Kind, namespace: str, name: str) -> bool:
        status, _ = await self._call("DELETE", kind.path(namespace, name),
                                     body={"propagationPolicy": "Background"})
        return status != 404


def _with_kind(obj: Any, kind: Kind) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise KubeApiError(f"Kubernetes API answered {kind.kind} with a non-object body")
    obj.setdefault("apiVersion", kind.api_version)
    obj.setdefault("kind", kind.kind)
    return obj
