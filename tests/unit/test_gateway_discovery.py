"""Per-pod discovery: DNS upstreams are expanded to pod URLs, static ones never."""

from __future__ import annotations

from kubeinfer_runtime.contract import EndpointRoute, RouteTable, VariantRoute
from kubeinfer_runtime.gateway.discovery import dns_upstreams, expand, pod_urls

SVC_A = "http://iris-a.ns.svc:8080"
SVC_B = "http://iris-b.ns.svc:8080"


def table(discovery: str = "dns") -> RouteTable:
    return RouteTable(revision=3, endpoints={"iris": EndpointRoute(name="iris", variants=[
        VariantRoute(name="a", weight=1, upstreams=[SVC_A], discovery=discovery),  # type: ignore[arg-type]
        VariantRoute(name="b", weight=1, upstreams=[SVC_B], discovery=discovery),  # type: ignore[arg-type]
    ])})


def upstreams(t: RouteTable) -> dict[str, list[str]]:
    return {v.name: v.upstreams for v in t.endpoints["iris"].variants}


def test_dns_upstreams_lists_only_dns_variants() -> None:
    assert dns_upstreams(table("dns")) == {SVC_A, SVC_B}
    assert dns_upstreams(table("static")) == set()


def test_expand_replaces_resolved_services_by_pods() -> None:
    resolved = {SVC_A: ("http://10.0.0.1:8080", "http://10.0.0.2:8080")}
    out = expand(table(), resolved)
    assert upstreams(out) == {
        "a": ["http://10.0.0.1:8080", "http://10.0.0.2:8080"],
        # Not resolved yet: keep the Service URL so requests still reach a pod.
        "b": [SVC_B],
    }
    assert out.revision == 3


def test_a_service_with_no_ready_pod_gets_no_upstream() -> None:
    assert upstreams(expand(table(), {SVC_A: (), SVC_B: ()})) == {"a": [], "b": []}


def test_static_variants_are_never_expanded() -> None:
    assert upstreams(expand(table("static"), {SVC_A: ("http://10.0.0.1:8080",)})) == {
        "a": [SVC_A], "b": [SVC_B]}


def test_pod_urls_keep_scheme_and_port_sort_and_bracket_ipv6() -> None:
    assert pod_urls(SVC_A, ["10.0.0.9", "fd00::1", "10.0.0.9", "10.0.0.10"]) == (
        "http://10.0.0.10:8080", "http://10.0.0.9:8080", "http://[fd00::1]:8080")
