"""Which pods the operator contacts over HTTP, and at which address (``reconcile.pod_addresses``).

Only ready pods of our own labels, at the IP their kubelet reported: no name to
resolve, nothing a namespace editor's Service or pod spec can point elsewhere.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from kubeinfer_operator.reconcile.pod_addresses import (
    MAX_PODS_CONTACTED,
    base_url,
    pod_address,
    pod_urls,
)
from kubeinfer_operator.render import edge_fleet as rf
from kubeinfer_operator.render import k8s_meta as meta

SELECTOR = meta.pod_selector("ep", meta.COMPONENT_GATEWAY)


def pod(ip: Any = "10.0.0.7", **changes: Any) -> dict[str, Any]:
    """A ready gateway pod of Endpoint ``ep`` as the API returns it, with ``changes``
    (dotted paths) applied."""
    out: dict[str, Any] = {
        "metadata": {"name": "ep-gateway-5d8f-abcde",
                     "labels": {**meta.labels("ep", meta.COMPONENT_GATEWAY),
                                "pod-template-hash": "5d8f"}},
        "spec": {"containers": [{"name": "runtime"}]},
        "status": {"phase": "Running", "podIP": ip,
                   "conditions": [{"type": "PodScheduled", "status": "True"},
                                  {"type": "Ready", "status": "True"}]},
    }
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        target = out
        for part in parents:
            target = target.setdefault(part, {})
        target[leaf] = value
    return out


def test_a_ready_pod_of_ours_is_reached_at_its_own_ip() -> None:
    assert pod_address(pod(), SELECTOR) == "10.0.0.7"
    assert pod_urls([pod()], SELECTOR, 9090) == ["http://10.0.0.7:9090"]


@pytest.mark.parametrize("changes", [
    {"status__phase": "Pending"},
    {"status__phase": "Succeeded"},
    {"status__conditions": [{"type": "Ready", "status": "False"}]},
    {"status__conditions": []},
    {"metadata__deletionTimestamp": "2026-01-01T00:00:00Z"},
])
def test_a_pod_that_is_not_ready_or_is_going_away_is_not_contacted(
        changes: dict[str, Any]) -> None:
    assert pod_address(pod(**changes), SELECTOR) is None


def test_a_pod_without_our_labels_is_not_contacted() -> None:
    other = pod()
    other["metadata"]["labels"][meta.LABEL_ENDPOINT] = "someone-else"
    assert pod_address(other, SELECTOR) is None
    bare = pod()
    del bare["metadata"]["labels"][meta.LABEL_COMPONENT]
    assert pod_address(bare, SELECTOR) is None
    # A fleet server's selector is not a gateway's, and the other way round.
    fleet = rf.pod_selector("sensors", rf.COMPONENT_FLEET_SERVER)
    assert pod_address(pod(), fleet) is None


def test_a_host_network_pod_is_not_contacted() -> None:
    # Its podIP is its node's: the operator would reach whatever listens on the node.
    assert pod_address(pod(spec__hostNetwork=True), SELECTOR) is None
    assert pod_address(pod(spec__hostNetwork=False), SELECTOR) == "10.0.0.7"


@pytest.mark.parametrize("ip", [
    None, "", 7, "attacker.example", "10.0.0.7:8080", "10.0.0.7/32", "http://10.0.0.7",
    "0.0.0.0", "::", "224.0.0.1", "169.254.169.254", "fe80::1", "::ffff:169.254.169.254",
])
def test_only_a_host_ip_literal_is_an_address(ip: Any) -> None:
    # Never a name (nothing is resolved), never a wildcard, multicast or link-local
    # address (a cloud's metadata service is link-local).
    assert pod_address(pod(ip), SELECTOR) is None


def test_ipv6_pods_are_bracketed_and_the_list_is_sorted_and_unique() -> None:
    pods = [pod("10.0.0.9"), pod("fd00::5"), pod("10.0.0.7"), pod("10.0.0.7"),
            pod("10.0.0.8", status__phase="Pending")]
    assert pod_urls(pods, SELECTOR, 9090) == [
        "http://10.0.0.7:9090", "http://10.0.0.9:9090", "http://[fd00::5]:9090"]
    assert base_url("fd00::5", 8080) == "http://[fd00::5]:8080"


def test_malformed_objects_are_skipped_not_errors() -> None:
    broken = copy.deepcopy(pod())
    broken["status"]["conditions"] = ["Ready"]
    for obj in ({}, {"metadata": None, "status": "x"}, broken,
                {"metadata": {"labels": SELECTOR}, "spec": [], "status": {}}):
        assert pod_address(obj, SELECTOR) is None


def test_thousands_of_pods_under_our_labels_cost_a_bounded_number_of_calls() -> None:
    # Anyone who may create pods in the namespace can label 5,000 like a gateway: the
    # scaler's shared HTTP pool and memory must not pay for each one every round.
    pods = [pod(f"10.1.{i // 250}.{i % 250 + 1}") for i in range(5000)]
    urls = pod_urls(pods, SELECTOR, 9090)
    assert len(urls) == MAX_PODS_CONTACTED and len(set(urls)) == len(urls)
    assert pod_urls(pods, SELECTOR, 9090, limit=2) == urls[:2]
