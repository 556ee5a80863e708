"""Which addresses outbound calls named by an Endpoint may reach.

Why this exists: an Endpoint's author writes URLs that *our* processes call —
``spec.async.notification.successUrl/errorUrl`` (POSTed by the async workers)
and ``spec.variants[].autoscaling.prometheusUrl`` (queried by the operator,
which holds a cluster-wide service-account token, and by local mode's
scaler). Left unchecked, a spec could point them at the cloud metadata
service (``http://169.254.169.254/...``: instance credentials) or at the
Kubernetes API server (``https://kubernetes.default.svc/...``) and have our
processes call it on the author's behalf (server-side request forgery).

So outbound calls may not reach, unless an allow-list names them:

* link-local addresses (IPv4 ``169.254.0.0/16``, IPv6 ``fe80::/10``), which
  hold the metadata services of every major cloud, and AWS's IPv6 metadata
  address ``fd00:ec2::254``; also their IPv4-mapped, IPv4-compatible and NAT64
  IPv6 forms (``::ffff:169.254.169.254``) and the odd IPv4 spellings resolvers
  accept (``2852039166``, ``0xa9.0xfe.0xa9.0xfe``, ``169.254.43518``);
* the Kubernetes API server: the names ``kubernetes``, ``kubernetes.default``,
  ``kubernetes.default.svc`` and ``kubernetes.default.svc.<cluster domain>``,
  the ``metadata.google.internal`` name, and the addresses in
  ``KUBERNETES_SERVICE_HOST`` / ``KUBERNETES_PORT_443_TCP_ADDR``.

The same policy runs on both sides, so they never disagree: the operator's
admission checks and ``kubeinfer up`` refuse a spec whose URL is a refused
literal address or API-server name (``url_problem``, PURE, no DNS), and every
call goes through ``guarded_connector`` (``contract.outbound_io``: aiohttp is
imported only by processes that make such calls), whose resolver refuses a name that
*resolves* to a refused address. aiohttp connects to the addresses the
resolver returned, so DNS cannot change between the check and the connect.
Callers also pass ``allow_redirects=False``: a redirect would be a second,
unchecked destination.

The allow-list (the chart's ``security.outboundAllowList``, env
``KUBEINFER_OUTBOUND_ALLOW`` of the operator, the async workers and
``kubeinfer up``) holds CIDRs (``169.254.170.2/32``), single IPs or host
names. An allowed host name is trusted wherever it resolves; an allowed
network lets its addresses through whatever name led to them.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import yarl

from kubeinfer_runtime.contract.redact import redact_url as redact_url

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Env var of every process that applies the policy (operator, async worker, ``kubeinfer up``).
ALLOW_ENV = "KUBEINFER_OUTBOUND_ALLOW"

#: The fix every refusal names.
FIX = ("outbound calls may not reach link-local or API-server addresses: use another URL, "
       f"or allow it with the chart's security.outboundAllowList ({ALLOW_ENV})")

_LINK_LOCAL: tuple[IPNetwork, ...] = (ipaddress.ip_network("169.254.0.0/16"),
                                      ipaddress.ip_network("fe80::/10"))
#: Cloud metadata services: AWS/GCP/Azure/OCI (IPv4), AWS (IPv6, not link-local).
_METADATA: frozenset[IPAddress] = frozenset({ipaddress.ip_address("169.254.169.254"),
                                             ipaddress.ip_address("fd00:ec2::254")})
#: Well-known NAT64 prefix: 64:ff9b::a9fe:a9fe reaches 169.254.169.254 through a NAT64.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
#: Names of the API server (every pod's resolver answers them) and of GCP's metadata server.
_API_SERVER_NAMES = frozenset({"kubernetes", "kubernetes.default", "kubernetes.default.svc"})
_METADATA_NAMES = frozenset({"metadata.google.internal"})
_API_SERVER_SUFFIX = "kubernetes.default.svc."
#: Env vars Kubernetes sets in every pod with the API server's Service address.
_API_SERVER_ENV = ("KUBERNETES_SERVICE_HOST", "KUBERNETES_PORT_443_TCP_ADDR")

_HOST_NAME = re.compile(r"^(?=.{1,253}$)([a-z0-9_]([-a-z0-9_]{0,61}[a-z0-9_])?)"
                        r"(\.[a-z0-9_]([-a-z0-9_]{0,61}[a-z0-9_])?)*$")
#: What ``inet_aton`` may read as an IPv4 address (decimal, hex, octal parts).
_NUMERIC_HOST = re.compile(r"[0-9a-fx.]+")


class OutboundRefused(OSError):
    """A destination the policy refuses; aiohttp reports it as ``ClientConnectorError``."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EACCES, message)

    def __str__(self) -> str:
        return str(self.strerror)


def _normal_host(host: str) -> str:
    """Lower case, no brackets, no trailing dot: the form names and addresses compare in."""
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host.rstrip(".")


def literal_address(host: str) -> IPAddress | None:
    """The address ``host`` denotes when it is an IP literal in any spelling resolvers accept.

    IPv6 (with or without a ``%zone``), dotted-quad IPv4, and the legacy IPv4
    forms ``inet_aton`` reads (``2852039166``, ``0xa9.0xfe.0xa9.0xfe``,
    ``0251.0376.0251.0376``, ``169.254.43518``). None for a host name.
    """
    host = _normal_host(host)
    if ":" in host:
        try:
            return ipaddress.IPv6Address(host.replace("%25", "%", 1))
        except ValueError:
            return None
    if not host or not _NUMERIC_HOST.fullmatch(host):
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, compatible, NAT64)."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    value = int(address)
    if address in _NAT64 or (value >> 32 == 0 and value > 1):  # ::a.b.c.d (not :: or ::1)
        return ipaddress.IPv4Address(value & 0xFFFFFFFF)
    return None


def _not_an_entry(entry: str) -> ValueError:
    return ValueError(f"Outbound allow-list entry {entry!r} is neither a CIDR, an IP address "
                      "nor a host name (no scheme, port, path, zone or wildcard); write "
                      "entries like 169.254.170.2/32, fd00:ec2::254 or prometheus.monitoring.svc")


def _parse_entry(entry: str) -> IPNetwork | str:
    if "://" in entry or "%" in entry or "*" in entry or " " in entry:
        raise _not_an_entry(entry)
    if "/" in entry:
        try:
            return ipaddress.ip_network(entry, strict=False)
        except ValueError as exc:
            raise ValueError(f"Outbound allow-list entry {entry!r} is not a valid CIDR ({exc}); "
                             "write it like 169.254.170.2/32 or fd00:ec2::/64") from None
    try:
        return ipaddress.ip_network(entry)
    except ValueError:
        pass
    name = _normal_host(entry)
    if literal_address(name) is not None or re.fullmatch(r"[0-9.]+", name):
        raise ValueError(f"Outbound allow-list entry {entry!r} is not a valid IP address; "
                         "write IPv4 addresses as four decimal parts (169.254.170.2) and "
                         "IPv6 ones without a zone (fd00:ec2::254)")
    if not _HOST_NAME.fullmatch(name):
        raise _not_an_entry(entry)
    return name


@dataclass(frozen=True)
class OutboundPolicy:
    """Refused destinations and the allow-list exceptions; build it with :meth:`parse`."""

    allow_networks: tuple[IPNetwork, ...] = ()
    #: Host names (lower case, no trailing dot) let through wherever they resolve.
    allow_hosts: frozenset[str] = frozenset()
    #: The API server's Service address (and host name, if the env held one).
    api_server_addresses: frozenset[str] = frozenset()
    #: Further refused networks, beyond the built-in ones (tests refuse 127.0.0.0/8).
    extra_refused: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, allow: str | Sequence[str] = "",
              env: Mapping[str, str] | None = None) -> OutboundPolicy:
        """The policy with allow-list ``allow`` (comma-separated, or a sequence of entries).

        ``env`` (default ``os.environ``) supplies the API server's address
        (``KUBERNETES_SERVICE_HOST``, ``KUBERNETES_PORT_443_TCP_ADDR``).
        Raises ValueError naming the first bad entry.
        """
        entries = allow.split(",") if isinstance(allow, str) else list(allow)
        networks: list[IPNetwork] = []
        hosts: set[str] = set()
        for raw in entries:
            entry = raw.strip()
            if not entry:
                continue
            parsed = _parse_entry(entry)
            if isinstance(parsed, str):
                hosts.add(parsed)
            else:
                networks.append(parsed)
        env = os.environ if env is None else env
        api: set[str] = set()
        for var in _API_SERVER_ENV:
            value = _normal_host(env.get(var, ""))
            if value:
                address = literal_address(value)
                api.add(str(address) if address is not None else value)
        return cls(tuple(networks), frozenset(hosts), frozenset(api))


def _address_reason(address: IPAddress, policy: OutboundPolicy) -> str | None:
    """What a refused ``address`` is ("the cloud metadata service (...)"); None: allowed."""
    embedded = _embedded_ipv4(address)
    candidates = [address] if embedded is None else [address, embedded]
    if any(c in net for c in candidates for net in policy.allow_networks
           if c.version == net.version):
        return None
    shown = str(address) if embedded is None else f"{address}, that is {embedded}"
    for candidate in candidates:
        plain = ipaddress.ip_address(str(candidate).split("%", 1)[0])
        if str(plain) in policy.api_server_addresses:
            return f"the Kubernetes API server ({shown})"
        if plain in _METADATA:
            return f"the cloud metadata service ({shown})"
        if any(plain in net for net in _LINK_LOCAL if net.version == plain.version):
            return f"a link-local address ({shown})"
        if any(plain in net for net in policy.extra_refused if net.version == plain.version):
            return f"a refused network ({shown})"
    return None


def _host_reason(host: str, policy: OutboundPolicy) -> str | None:
    """Why ``host`` (a name or literal, as in a URL) is refused; None when it is not."""
    name = _normal_host(host)
    if name in policy.allow_hosts:
        return None
    address = literal_address(name)
    if address is not None:
        return _address_reason(address, policy)
    if (name in _API_SERVER_NAMES or name.startswith(_API_SERVER_SUFFIX)
            or name in policy.api_server_addresses):
        return f"the Kubernetes API server ({name})"
    if name in _METADATA_NAMES:
        return f"the cloud metadata service ({name})"
    return None


def host_problem(host: str, policy: OutboundPolicy) -> str | None:
    """Why calls to ``host`` are refused before resolving it (PURE); None: go ahead."""
    reason = _host_reason(host, policy)
    return None if reason is None else f"Host {host!r} points at {reason}; {FIX}"


def address_problem(host: str, address: str, policy: OutboundPolicy) -> str | None:
    """Why ``host``, resolved to ``address``, may not be called (PURE); None: go ahead.

    An allowed host name passes whatever it resolves to.
    """
    if _normal_host(host) in policy.allow_hosts:
        return None
    parsed = literal_address(address)
    if parsed is None:
        return f"Host {host!r} resolved to {address!r}, which is not an IP address; {FIX}"
    reason = _address_reason(parsed, policy)
    return None if reason is None else f"Host {host!r} resolves to {reason}; {FIX}"


def url_problem(url: str, policy: OutboundPolicy, field: str) -> str | None:
    """What is wrong with calling ``url`` (PURE, no DNS); None when it may be called.

    The scheme must be http or https and a host present; a literal refused
    address (any spelling) or an API-server name is refused unless allowed.
    The message names ``field`` and the fix; credentials in the URL are redacted.
    """
    shown = redact_url(url)
    try:
        parsed = yarl.URL(url)  # the parser aiohttp uses: no disagreement about the host
        scheme, host = parsed.scheme, parsed.raw_host
    except (ValueError, TypeError) as exc:
        return f"{field}: {shown!r} is not a valid URL ({exc}); write it like https://host/path"
    if scheme not in ("http", "https"):
        return f"{field}: {shown!r} must be an http:// or https:// URL"
    if not host:
        return f"{field}: {shown!r} names no host; write it like https://host/path"
    reason = _host_reason(host, policy)
    return None if reason is None else f"{field}: {shown!r} points at {reason}; {FIX}"
