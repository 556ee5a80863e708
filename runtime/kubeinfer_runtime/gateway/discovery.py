"""Per-pod upstreams on Kubernetes: resolve each variant's headless Service.

Behind a ClusterIP Service, kube-proxy picks the pod, so the gateway could not
keep one model on one replica (multi-model cache affinity), health-check each
pod, or notice a single bad pod. The operator therefore renders variant
Services headless and marks their routes ``discovery: dns``: cluster DNS then
answers with the addresses of the variant's *ready* pods, and the gateway
routes, balances and health-checks per pod.

``expand`` is pure: it swaps each DNS upstream for the pod URLs resolved so
far. An upstream not resolved yet is kept as is (requests still reach some
pod through DNS), an upstream that resolves to nothing (no ready pod) yields no
URL, so the gateway answers 503 for it instead of guessing.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Iterable, Mapping, Sequence
from typing import TypeVar
from urllib.parse import urlsplit

from kubeinfer_runtime.contract import RouteTable, VariantRoute
from kubeinfer_runtime.contract.shadow import ShadowRoute

log = logging.getLogger("kubeinfer.gateway")

#: getaddrinfo errors that mean "this name has no address now" (a headless
#: Service with no ready pod), as opposed to a DNS outage.
_NO_ADDRESS = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}


def dns_upstreams(table: RouteTable) -> set[str]:
    """The upstream URLs the table asks the gateway to resolve per pod."""
    urls: set[str] = set()
    for endpoint in table.endpoints.values():
        for variant in endpoint.variants:
            if variant.discovery == "dns":
                urls.update(variant.upstreams)
        for shadow in endpoint.shadows:
            if shadow.discovery == "dns":
                urls.update(shadow.upstreams)
    return urls


def expand(table: RouteTable, resolved: Mapping[str, Sequence[str]]) -> RouteTable:
    """``table`` with every resolved DNS upstream replaced by its pod URLs (variants'
    and shadows': a shadow's copies are spread over its pods as requests are)."""
    if not resolved:
        return table
    endpoints = {}
    for name, endpoint in table.endpoints.items():
        endpoints[name] = endpoint.model_copy(update={
            "variants": [_expanded(v, resolved) for v in endpoint.variants],
            "shadows": [_expanded(s, resolved) for s in endpoint.shadows]})
    return table.model_copy(update={"endpoints": endpoints})


F = TypeVar("F", VariantRoute, ShadowRoute)


def _expanded(fleet: F, resolved: Mapping[str, Sequence[str]]) -> F:
    if fleet.discovery != "dns":
        return fleet
    urls: list[str] = []
    for url in fleet.upstreams:
        urls.extend(resolved.get(url, (url,)))
    return fleet.model_copy(update={"upstreams": urls})


def pod_urls(url: str, addresses: Iterable[str]) -> tuple[str, ...]:
    """``http://svc:8080`` + pod addresses → ``http://10.0.0.7:8080``, sorted, unique."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    out = set()
    for addr in addresses:
        host = f"[{addr}]" if ipaddress.ip_address(addr).version == 6 else addr
        out.add(f"{parts.scheme}://{host}{port}")
    return tuple(sorted(out))


async def resolve(url: str) -> tuple[str, ...] | None:
    """The pod URLs behind ``url``'s host; () when it has none; None on a DNS failure."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, parts.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        if exc.errno in _NO_ADDRESS:
            return ()
        log.warning("Resolving %s failed (%s): keeping its last known pods", host, exc)
        return None
    return pod_urls(url, (str(info[4][0]) for info in infos))


async def resolve_all(urls: Iterable[str],
                      previous: Mapping[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    """Resolve every URL; a failed lookup keeps the previous answer (or none yet)."""
    wanted = sorted(urls)
    answers = await asyncio.gather(*(resolve(u) for u in wanted))
    out: dict[str, tuple[str, ...]] = {}
    for url, answer in zip(wanted, answers, strict=True):
        if answer is not None:
            out[url] = answer
        elif url in previous:
            out[url] = previous[url]
    return out
