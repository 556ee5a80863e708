"""Which pods the operator may contact over HTTP, and at which address: PURE.

The operator reads pods it rendered in tenants' namespaces: every gateway pod's
``/metrics`` (auto scaling, rollout alarms, ``status.shadow``) and the fleet
server's ``GET /v1/fleet`` (with the fleet's status token). The Services in
front of those pods live in the same namespaces, and whoever may ``edit``
there may change them: an ``ExternalName`` to a host of their choosing, another
selector, other ports. Calling a Service by its DNS name would send the
operator's requests (and the token) wherever the Service points this second,
and read back whatever answers there as the numbers scaling and rollouts act
on. A check of the Service before each call would not close that: the name is
resolved after the check, and a Service can flip between the two.

So no name is resolved at all. The operator lists the pods by the labels it
renders on them and connects to the address the kubelet reported for each one
that is ready (``status.podIP``: pod status is the kubelet's to write, the
namespace's ``edit`` role cannot set it). A pod someone else labelled like
ours is still a pod of that namespace, reached at its own address, never a
host outside it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def pod_address(pod: Mapping[str, Any], selector: Mapping[str, str]) -> str | None:
    """The IP to reach ``pod`` at, or None when the operator must not contact it.

    It must carry every label of ``selector`` (the list call filtered by them;
    checked again so nothing wider slips through), be Running and Ready and not
    terminating, have its own network namespace (a host-network pod's IP is its
    node's: whatever listens on the node would answer), and report an IP literal
    that is a host address (nothing to resolve; never a wildcard, multicast or
    link-local address such as a cloud metadata service's).
    """
    metadata = _mapping(pod.get("metadata"))
    labels = _mapping(metadata.get("labels"))
    if any(labels.get(k) != v for k, v in selector.items()):
        return None
    if metadata.get("deletionTimestamp"):
        return None
    if _mapping(pod.get("spec")).get("hostNetwork") is True:
        return None
    status = _mapping(pod.get("status"))
    if status.get("phase") != "Running":
        return None
    ready = any(_mapping(c).get("type") == "Ready" and _mapping(c).get("status") == "True"
                for c in status.get("conditions") or [])
    if not ready:
        return None
    raw = status.get("podIP")
    if not isinstance(raw, str):
        return None
    try:
        ip = ipaddress.ip_address(raw)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # judged as the IPv4 address it reaches
    if ip.is_unspecified or ip.is_multicast or ip.is_link_local:
        return None
    return str(ip)


def base_url(ip: str, port: int) -> str:
    """``http://10.0.0.7:9090`` (IPv6 in brackets)."""
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{port}"


#: Most pods of one selector the operator contacts per call. The operator runs a few
#: gateway / fleet server replicas per object; anyone who may create pods in a namespace
#: can add thousands under the same labels, and each would cost a connection of the
#: operator's shared HTTP pool (and up to a metrics answer of memory) every round.
MAX_PODS_CONTACTED = 64


def pod_urls(pods: Iterable[Mapping[str, Any]], selector: Mapping[str, str],
             port: int, limit: int = MAX_PODS_CONTACTED) -> list[str]:
    """Base URLs of the pods of ``pods`` the operator may contact (``pod_address``) on
    ``port``, sorted, each address once, at most ``limit`` of them."""
    addresses = {a for p in pods if (a := pod_address(p, selector)) is not None}
    return [base_url(a, port) for a in sorted(addresses)[:max(0, limit)]]
