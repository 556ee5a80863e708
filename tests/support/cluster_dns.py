"""Cluster DNS for operator tests: ``<service>.<namespace>.svc`` answered from the emulator.

No CoreDNS runs here, so a Service name would not resolve at all, and a test
could not tell an operator that calls a Service by its name from one that
reaches pods by their own addresses: both would simply fail to connect. While
installed (it replaces ``socket.getaddrinfo`` in this process: asyncio's,
aiohttp's and httpx's lookups all end there), names are answered as CoreDNS
would answer them from the emulator's Services at that moment:

* ``type: ExternalName``: a CNAME to ``spec.externalName``, which resolves
  through ``hosts`` first (``attacker.example`` → ``127.0.0.2``), else the
  system;
* any other: the IPs of the ready pods its selector picks (no kube-proxy here,
  so a ClusterIP Service is answered like a headless one, with its pods);
* no such Service, or no ready pod: no such name.

Every cluster name asked for is recorded in ``asked``.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import httpx
import pytest


def _ready(pod: Mapping[str, Any]) -> bool:
    status = pod.get("status") or {}
    return status.get("phase") == "Running" and bool(status.get("podIP")) and any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or [])


class ClusterDns:
    def __init__(self, api_url: str, hosts: Mapping[str, str] | None = None) -> None:
        self.http = httpx.Client(base_url=api_url, timeout=10.0)
        self.hosts = {k.lower(): v for k, v in (hosts or {}).items()}
        #: Cluster names (``<service>.<namespace>.svc...``) looked up, in order.
        self.asked: list[str] = []
        self._lock = threading.Lock()
        self._real = socket.getaddrinfo

    def close(self) -> None:
        self.http.close()

    def addresses(self, host: str) -> list[str] | None:
        """The IPs ``host`` resolves to here; None: neither a cluster name nor in ``hosts``
        (the system resolves it)."""
        name = host.rstrip(".").lower()
        if name in self.hosts:
            return [self.hosts[name]]
        parts = name.split(".")
        if len(parts) < 3 or parts[2] != "svc":
            return None
        with self._lock:
            self.asked.append(name)
        service, namespace = parts[0], parts[1]
        r = self.http.get(f"/api/v1/namespaces/{namespace}/services/{service}")
        if r.status_code == 404:
            return []
        r.raise_for_status()
        spec = r.json().get("spec") or {}
        if spec.get("type") == "ExternalName":
            target = str(spec.get("externalName") or "")
            found = self.addresses(target)
            if found is not None:
                return found
            return sorted({str(info[4][0]) for info in self._real(target, None)})
        selector = spec.get("selector") or {}
        if not selector:
            return []
        pods = self.http.get(f"/api/v1/namespaces/{namespace}/pods", params={
            "labelSelector": ",".join(f"{k}={v}" for k, v in sorted(selector.items()))})
        pods.raise_for_status()
        return sorted({p["status"]["podIP"] for p in pods.json()["items"] if _ready(p)})

    def getaddrinfo(self, host: Any, port: Any, family: int = 0, type: int = 0,
                    proto: int = 0, flags: int = 0) -> list[Any]:
        text = host.decode() if isinstance(host, bytes) else host
        found = self.addresses(text) if isinstance(text, str) else None
        if found is None:
            return self._real(host, port, family, type, proto, flags)
        if not found:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        out: list[Any] = []
        for address in found:
            out += self._real(address, port, family, type, proto,
                              flags | socket.AI_NUMERICHOST)
        return out

    @contextmanager
    def installed(self) -> Iterator[ClusterDns]:
        patch = pytest.MonkeyPatch()
        patch.setattr(socket, "getaddrinfo", self.getaddrinfo)
        try:
            yield self
        finally:
            patch.undo()
