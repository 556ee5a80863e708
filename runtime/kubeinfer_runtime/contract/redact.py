"""Credentials out of what processes print: logs, status, debug pages: PURE.

URLs from settings and specs may carry a password (``redis://:pw@host``) or a
token (a webhook's query string); anything shown to a person goes through
here first. Used by both sides, so it lives in the contract.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

#: Keys of JSON documents whose values are URLs that may hold credentials.
URL_KEYS = frozenset({"redis_url", "success_url", "error_url", "prometheus_url",
                      "scaler_url"})


def redact_url(url: str) -> str:
    """``url`` fit for logs and status: userinfo password and query values become ``***``.

    A user name without a password is redacted too (it is often a token).
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "***"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:***@{hostport}" if colon else f"***@{hostport}"
    query = "&".join(f"{item.split('=', 1)[0]}=***" if "=" in item else "***"
                     for item in parts.query.split("&")) if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_urls(doc: Any) -> Any:
    """``doc`` (JSON data) with every value under a ``URL_KEYS`` key redacted."""
    if isinstance(doc, dict):
        return {k: (redact_url(v) if k in URL_KEYS and isinstance(v, str) else redact_urls(v))
                for k, v in doc.items()}
    if isinstance(doc, list):
        return [redact_urls(v) for v in doc]
    return doc
