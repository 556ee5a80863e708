"""Per-namespace Redis users: what one namespace's gateways and async workers may touch: PURE.

Every async Endpoint's queue lives in one Redis (the chart's ``runtime.redis``),
under keys ``kubeinfer:async:{<namespace>.<endpoint>}:…`` (``contract.AsyncQueueKeys``).
Handing every namespace the operator's own URL would let an async worker (which
runs the Endpoint author's handler steps), or anyone who can read Secrets in one
namespace, read and write every other namespace's queues. So the runtime Secret
of a namespace carries a URL of that namespace's own ACL user instead:

* its name is ``kubeinfer-ns-<namespace>``;
* its password is derived, ``HMAC-SHA256(operator's Redis URL, namespace)``, so no
  state is kept, every operator replica computes the same one, and a new admin
  password (a new URL) gives every namespace a new one;
* it may touch only keys ``kubeinfer:async:{<namespace>.*`` and no channel, and
  run neither administrative nor dangerous commands, nor those that list or count
  other namespaces' keys (``SCAN``, ``RANDOMKEY``, ``DBSIZE``) or drop everyone's
  scripts (``SCRIPT FLUSH|KILL``, ``FUNCTION``).

``redis_acl`` (the I/O) sends ``acl_rules`` with ``ACL SETUSER``.
"""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

USER_PREFIX = "kubeinfer-ns-"
#: What a namespace's user may run beyond its keys: everything but these.
DENIED = ("-@admin", "-@dangerous", "-@pubsub", "-scan", "-randomkey", "-dbsize",
          "-script|flush", "-script|kill", "-function")
#: URL query parameters that could carry the operator's own credentials.
_CREDENTIAL_PARAMS = frozenset({"username", "password"})
_SCHEMES = ("redis", "rediss")


class RedisUrlError(ValueError):
    """The operator's Redis URL cannot be turned into a namespace's (the message says why)."""


def user(namespace: str) -> str:
    return USER_PREFIX + namespace


def password(admin_url: str, namespace: str) -> str:
    """``namespace``'s password, derived from the operator's whole Redis URL."""
    return hmac.new(admin_url.encode(), b"kubeinfer-redis-user:" + namespace.encode(),
                    hashlib.sha256).hexdigest()


def key_pattern(namespace: str) -> str:
    """The keys of every queue of ``namespace``: their queue is ``<namespace>.<name>``
    (``render.async_plan``), and a namespace is a DNS label (no dot), so no other
    namespace's queue matches."""
    return "kubeinfer:async:{" + namespace + ".*"


def acl_rules(admin_url: str, namespace: str) -> list[str]:
    """``ACL SETUSER <user>`` arguments: the whole user, from scratch (``reset``), so
    sending them again is harmless and repairs any change made by hand."""
    return ["reset", "on", ">" + password(admin_url, namespace), "~" + key_pattern(namespace),
            "resetchannels", "+@all", *DENIED]


def namespace_url(admin_url: str, namespace: str) -> str:
    """The operator's URL with ``namespace``'s user and password instead of its own.

    Raises ``RedisUrlError`` for a URL that is not ``redis://`` or ``rediss://`` (a unix
    socket does not reach pods)."""
    refused = RedisUrlError("the operator's Redis URL must be redis://host[:port][/db] or "
                            "rediss://… to give each namespace its own Redis user")
    try:
        parts = urlsplit(admin_url)
        # urllib's ValueError for a port that is not a number quotes it: with a password
        # holding an unencoded '/', the start of the password. Never passed on.
        port = parts.port
    except ValueError:
        raise refused from None
    if parts.scheme not in _SCHEMES or not parts.hostname:
        raise refused
    host = parts.hostname
    if ":" in host:  # an IPv6 literal keeps its brackets
        host = f"[{host}]"
    if port is not None:
        host = f"{host}:{port}"
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
                       if k.lower() not in _CREDENTIAL_PARAMS])
    netloc = f"{quote(user(namespace), safe='')}:{password(admin_url, namespace)}@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))
