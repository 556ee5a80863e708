"""The outbound policy: which destinations spec URLs may reach (``contract.outbound``)."""

from __future__ import annotations

import ipaddress
import logging
import socket
from dataclasses import replace

import aiohttp
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from kubeinfer_runtime.contract.outbound import (
    OutboundPolicy,
    OutboundRefused,
    address_problem,
    host_problem,
    literal_address,
    redact_url,
    url_problem,
)
from kubeinfer_runtime.contract.outbound_io import GuardedResolver, guarded_connector
from kubeinfer_runtime.queue.notifier import Notifier

ENV = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_PORT_443_TCP_ADDR": "10.96.0.2"}
POLICY = OutboundPolicy.parse("", env=ENV)
FIELD = "spec.async.notification.successUrl"


@pytest.mark.parametrize(("url", "what"), [
    ("http://169.254.169.254/latest/meta-data/", "the cloud metadata service (169.254.169.254)"),
    ("http://2852039166/", "the cloud metadata service (169.254.169.254)"),
    ("http://0xa9fea9fe/", "the cloud metadata service (169.254.169.254)"),
    ("http://0xa9.0xfe.0xa9.0xfe/", "the cloud metadata service (169.254.169.254)"),
    ("http://0251.0376.0251.0376/", "the cloud metadata service (169.254.169.254)"),
    ("http://169.254.43518/", "the cloud metadata service (169.254.169.254)"),
    ("http://169.254.169.254./", "the cloud metadata service (169.254.169.254)"),
    ("http://169.254.170.2/v2/credentials", "a link-local address (169.254.170.2)"),
    ("http://[::ffff:169.254.169.254]/", "the cloud metadata service (::ffff:a9fe:a9fe, "
                                         "that is 169.254.169.254)"),
    ("http://[::ffff:a9fe:a9fe]:80/", "the cloud metadata service"),
    ("http://[::169.254.169.254]/", "the cloud metadata service"),
    ("http://[64:ff9b::a9fe:a9fe]/", "the cloud metadata service"),
    ("http://[fd00:ec2::254]/latest", "the cloud metadata service (fd00:ec2::254)"),
    ("http://[FD00:EC2:0::254]/", "the cloud metadata service (fd00:ec2::254)"),
    ("http://[fe80::1%25eth0]/", "a link-local address (fe80::1%eth0)"),
    ("http://[fe80::a9fe:a9fe]/", "a link-local address"),
    ("https://kubernetes/api", "the Kubernetes API server (kubernetes)"),
    ("https://kubernetes.default/api", "the Kubernetes API server (kubernetes.default)"),
    ("https://kubernetes.default.svc/api", "the Kubernetes API server (kubernetes.default.svc)"),
    ("https://kubernetes.default.svc.:443/", "the Kubernetes API server (kubernetes.default.svc)"),
    ("https://KUBERNETES.Default.SVC/", "the Kubernetes API server (kubernetes.default.svc)"),
    ("https://kubernetes.default.svc.cluster.local/api",
     "the Kubernetes API server (kubernetes.default.svc.cluster.local)"),
    ("https://kubernetes.default.svc.corp.example./",
     "the Kubernetes API server (kubernetes.default.svc.corp.example)"),
    ("https://10.96.0.1/api", "the Kubernetes API server (10.96.0.1)"),
    ("https://10.96.0.2:6443/", "the Kubernetes API server (10.96.0.2)"),
    ("https://[::ffff:10.96.0.1]/", "the Kubernetes API server (::ffff:a60:1, that is 10.96.0.1)"),
    ("http://metadata.google.internal/computeMetadata/v1/",
     "the cloud metadata service (metadata.google.internal)"),
])
def test_refused_urls(url: str, what: str) -> None:
    problem = url_problem(url, POLICY, FIELD)
    assert problem is not None
    assert problem.startswith(f"{FIELD}: ")
    assert f"points at {what}" in problem
    assert problem.endswith("use another URL, or allow it with the chart's "
                            "security.outboundAllowList (KUBEINFER_OUTBOUND_ALLOW)")


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:9999/ok", "https://hooks.example.com/notify", "http://prometheus:9090",
    "http://prometheus.monitoring.svc.cluster.local:9090", "http://10.96.0.10/",
    "http://[2001:db8::1]/", "http://169.253.255.255/", "http://169.255.0.1/",
    "https://kubernetes.example.com/", "https://kubernetes-default.svc/",
    "https://mykubernetes.default.svc/",
])
def test_allowed_urls(url: str) -> None:
    assert url_problem(url, POLICY, FIELD) is None


def test_api_server_address_comes_from_the_environment() -> None:
    assert url_problem("https://10.96.0.1/", OutboundPolicy.parse("", env={}), FIELD) is None
    assert OutboundPolicy.parse("", env=ENV).api_server_addresses == {"10.96.0.1", "10.96.0.2"}
    named = OutboundPolicy.parse("", env={"KUBERNETES_SERVICE_HOST": "API.internal."})
    assert "Kubernetes API server (api.internal)" in str(
        url_problem("https://api.internal/", named, FIELD))


@pytest.mark.parametrize(("url", "fragment"), [
    ("ftp://hooks.example.com/x", "must be an http:// or https:// URL"),
    ("file:///etc/passwd", "must be an http:// or https:// URL"),
    ("http:///path", "names no host"),
    ("hooks.example.com/x", "must be an http:// or https:// URL"),
    ("http://169.254.169.254:port/", "is not a valid URL"),
])
def test_malformed_urls(url: str, fragment: str) -> None:
    problem = url_problem(url, POLICY, FIELD)
    assert problem is not None and problem.startswith(f"{FIELD}: ") and fragment in problem


def test_allow_list_lets_specific_destinations_through() -> None:
    allow = OutboundPolicy.parse(
        " 169.254.170.2/32, kubernetes.default.svc. ,FD00:EC2::254, 10.96.0.0/12", env=ENV)
    assert url_problem("http://169.254.170.2/v2/credentials", allow, FIELD) is None
    assert url_problem("http://[::ffff:169.254.170.2]/", allow, FIELD) is None  # same address
    assert url_problem("https://KUBERNETES.default.svc/", allow, FIELD) is None
    assert url_problem("http://[fd00:ec2::254]/", allow, FIELD) is None
    assert url_problem("https://10.96.0.1/", allow, FIELD) is None
    # Only what was named: the metadata address and the other API-server names stay refused.
    assert url_problem("http://169.254.169.254/", allow, FIELD) is not None
    assert url_problem("https://kubernetes.default.svc.cluster.local/", allow, FIELD) is not None
    assert url_problem("https://kubernetes/", allow, FIELD) is not None
    # A sequence works as well as a comma-separated string.
    as_list = OutboundPolicy.parse(["169.254.170.2", "kubernetes.default.svc"], env=ENV)
    assert as_list.allow_networks == (ipaddress.ip_network("169.254.170.2/32"),)
    assert as_list.allow_hosts == {"kubernetes.default.svc"}


@pytest.mark.parametrize(("entry", "fragment"), [
    ("10.0.0.0/33", "is not a valid CIDR"),
    ("300.1.1.1", "is not a valid IP address"),
    ("169.254.43518", "is not a valid IP address"),
    ("2852039166", "is not a valid IP address"),
    ("http://169.254.170.2/", "neither a CIDR, an IP address nor a host name"),
    ("*.example.com", "neither a CIDR, an IP address nor a host name"),
    ("fe80::1%eth0", "neither a CIDR, an IP address nor a host name"),
    ("prometheus:9090", "neither a CIDR, an IP address nor a host name"),
    ("bad host", "neither a CIDR, an IP address nor a host name"),
])
def test_allow_list_errors_name_the_entry(entry: str, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        OutboundPolicy.parse(f"169.254.170.2/32,{entry}", env={})
    message = str(info.value)
    assert f"Outbound allow-list entry {entry!r}" in message and fragment in message


def test_empty_allow_list_entries_are_ignored() -> None:
    assert OutboundPolicy.parse(" , ,", env={}) == OutboundPolicy()


@pytest.mark.parametrize(("host", "address"), [
    ("2852039166", "169.254.169.254"), ("0xa9.0xfe.0xa9.0xfe", "169.254.169.254"),
    ("[::ffff:a9fe:a9fe]", "::ffff:a9fe:a9fe"), ("fe80::1%eth0", "fe80::1%eth0"),
    ("example.com", None), ("1e100.net", None), ("deadbeef", None),
])
def test_literal_address(host: str, address: str | None) -> None:
    parsed = literal_address(host)
    assert (None if parsed is None else str(parsed)) == address


def test_address_problem() -> None:
    assert address_problem("hooks.example.com", "93.184.216.34", POLICY) is None
    problem = address_problem("evil.example.com", "169.254.169.254", POLICY)
    assert problem is not None
    assert problem.startswith("Host 'evil.example.com' resolves to the cloud metadata service")
    assert address_problem("api.example.com", "10.96.0.1", POLICY) is not None
    assert address_problem("x.example.com", "fe80::1%eth0", POLICY) is not None
    # An allowed host name is trusted wherever it resolves.
    trusted = OutboundPolicy.parse("creds.internal", env=ENV)
    assert address_problem("creds.internal.", "169.254.170.2", trusted) is None
    assert host_problem("creds.internal", trusted) is None


def test_extra_refused_networks() -> None:
    policy = replace(POLICY, extra_refused=(ipaddress.ip_network("127.0.0.0/8"),))
    assert "a refused network (127.0.0.1)" in str(url_problem("http://127.0.0.1/", policy, FIELD))
    assert url_problem("http://127.0.0.1/", POLICY, FIELD) is None


@pytest.mark.parametrize("url", ["https://hook:c2Vj/cmV0@hooks.example.com/x",
                                 "https://hook:c2Vj#cmV0@hooks.example.com/x"])
def test_a_refused_url_with_an_unencoded_slash_in_its_password_quotes_none_of_it(
        url: str) -> None:
    # The message goes to the Endpoint's status and an Event: redact_url took the
    # password's start for a port and showed the URL whole.
    problem = url_problem(url, POLICY, FIELD)
    assert problem is not None and FIELD in problem
    assert "c2Vj" not in problem and "cmV0" not in problem


def test_redact_url() -> None:
    assert (redact_url("https://user:s3cret@hooks.example.com:8443/p/a?token=abc&x=1#f")
            == "https://user:***@hooks.example.com:8443/p/a?token=***&x=***#f")
    assert redact_url("https://ghp_token@hooks.example.com/") == "https://***@hooks.example.com/"
    assert redact_url("https://hooks.example.com/x?signature") == "https://hooks.example.com/x?***"
    assert redact_url("http://hooks.example.com/plain") == "http://hooks.example.com/plain"
    assert redact_url("http://[::1/") == "***"  # unparseable: nothing of it shown


def test_messages_never_show_credentials() -> None:
    problem = url_problem("http://admin:hunter2@169.254.169.254/?key=topsecret", POLICY, FIELD)
    assert problem is not None
    assert "hunter2" not in problem and "topsecret" not in problem
    assert "'http://admin:***@169.254.169.254/?key=***'" in problem


# -- the resolver and the connector -------------------------------------------------------------


class FakeResolver(AbstractResolver):
    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.asked: list[str] = []
        self.closed = False

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        self.asked.append(host)
        return [ResolveResult(hostname=host, host=a, port=port,
                              family=socket.AF_INET6 if ":" in a else socket.AF_INET,
                              proto=0, flags=socket.AI_NUMERICHOST)
                for a in self.answers[host]]

    async def close(self) -> None:
        self.closed = True


async def test_resolver_refuses_a_name_resolving_to_a_refused_address() -> None:
    fake = FakeResolver({"good.example.com": ["93.184.216.34", "2606:2800:220:1::1"],
                         "rebind.example.com": ["93.184.216.34", "169.254.169.254"],
                         "mapped.example.com": ["::ffff:169.254.169.254"],
                         "api.example.com": ["10.96.0.1"]})
    resolver = GuardedResolver(POLICY, fake)
    answers = await resolver.resolve("good.example.com", 80)
    assert [a["host"] for a in answers] == ["93.184.216.34", "2606:2800:220:1::1"]
    for host, what in [("rebind.example.com", "the cloud metadata service (169.254.169.254)"),
                       ("mapped.example.com", "the cloud metadata service"),
                       ("api.example.com", "the Kubernetes API server (10.96.0.1)")]:
        with pytest.raises(OutboundRefused) as info:
            await resolver.resolve(host, 80)
        assert str(info.value).startswith(f"Host {host!r} resolves to {what}")
    # Refused names are never even looked up.
    with pytest.raises(OutboundRefused, match="Kubernetes API server"):
        await resolver.resolve("kubernetes.default.svc", 443)
    assert "kubernetes.default.svc" not in fake.asked
    await resolver.close()
    assert fake.closed


async def test_resolver_lets_allowed_addresses_through() -> None:
    fake = FakeResolver({"ecs.example.com": ["169.254.170.2"]})
    allowed = GuardedResolver(OutboundPolicy.parse("169.254.170.2/32", env={}), fake)
    assert [a["host"] for a in await allowed.resolve("ecs.example.com", 80)] == ["169.254.170.2"]


@pytest.mark.parametrize("url", [
    "http://169.254.169.254/latest/meta-data/",  # aiohttp skips the resolver for IP literals
    "http://[::ffff:a9fe:a9fe]/",
    "http://[fd00:ec2::254]/",
    "https://10.96.0.1/api",
    "http://0xa9.0xfe.0xa9.0xfe/",                # a "name" to aiohttp: the resolver's check
    "https://kubernetes.default.svc/api",
    "http://rebind.example.com/",                 # resolves to the metadata address
])
async def test_connector_refuses_before_connecting(url: str) -> None:
    # No connection may be opened (the unit-test guard would raise, not OutboundRefused).
    fake = FakeResolver({"rebind.example.com": ["169.254.169.254"]})
    async with aiohttp.ClientSession(connector=guarded_connector(POLICY, resolver=fake)) as s:
        with pytest.raises(aiohttp.ClientConnectorError) as info:
            await s.get(url, allow_redirects=False)
    assert isinstance(info.value.os_error, OutboundRefused)
    assert "outbound calls may not reach link-local or API-server addresses" in str(info.value)
    assert fake.asked in ([], ["rebind.example.com"])


# -- the notifier -------------------------------------------------------------------------------


async def test_notifier_refuses_at_once_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier(policy=POLICY, attempts=8, backoff_first_s=60.0)
    url = "http://user:pw@169.254.169.254/hook?token=secret"
    with caplog.at_level(logging.DEBUG, logger="kubeinfer.queue"):
        assert await notifier.send(url, b"{}", "id-1") is False  # no 8 retries: no 60 s wait
        assert await notifier.send(url, b"{}", "id-2") is False
    await notifier.close()
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert errors[0].startswith("Notification of id-1 not sent: Notification webhook: "
                                "'http://user:***@169.254.169.254/hook?token=***' points at "
                                "the cloud metadata service (169.254.169.254)")
    assert all("secret" not in r.getMessage() and ":pw@" not in r.getMessage()
               for r in caplog.records)


async def test_notifier_refuses_a_name_resolving_to_a_refused_address(
        caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier(policy=POLICY, attempts=8, backoff_first_s=60.0)
    fake = FakeResolver({"rebind.example.com": ["169.254.169.254"]})
    notifier._session = aiohttp.ClientSession(connector=guarded_connector(POLICY, resolver=fake))
    with caplog.at_level(logging.ERROR, logger="kubeinfer.queue"):
        assert await notifier.send("http://rebind.example.com/x", b"{}", "id-1") is False
    await notifier.close()
    assert fake.asked == ["rebind.example.com"]  # once: a refusal is not retried
    [error] = [r.getMessage() for r in caplog.records]
    assert "Host 'rebind.example.com' resolves to the cloud metadata service" in error


def test_operator_settings_refuse_a_bad_allow_list() -> None:
    from pydantic import ValidationError

    from kubeinfer_operator.settings import OperatorSettings

    with pytest.raises(ValidationError, match="Outbound allow-list entry 'http://x'"):
        OperatorSettings(outbound_allow="169.254.170.2/32,http://x")
    policy = OperatorSettings(outbound_allow="169.254.170.2/32").outbound_policy()
    assert policy.allow_networks == (ipaddress.ip_network("169.254.170.2/32"),)
