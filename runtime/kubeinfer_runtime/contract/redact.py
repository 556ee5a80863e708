"""Credentials out of what processes print: logs, status, debug pages: PURE.

URLs from settings and specs may carry a password (``redis://:pw@host``) or a
token (a webhook's query string); anything shown to a person goes through
here first. Used by both sides, so it lives in the contract.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import SplitResult, urlsplit, urlunsplit

#: Keys of JSON documents whose values are URLs that may hold credentials.
URL_KEYS = frozenset({"redis_url", "success_url", "error_url", "prometheus_url",
                      "scaler_url"})


_C0_OR_SPACE = "".join(map(chr, range(0x21)))
_UNSAFE = str.maketrans("", "", "\t\r\n")


def redact_url(url: str) -> str:
    """``url`` fit for logs and status: userinfo password and query values become ``***``.

    A user name without a password is redacted too (it is often a token).
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "***"
    if _userinfo_cut_short(url, parts):
        # All up to the last '@' is taken for the userinfo: nothing of it is shown.
        _, _, after = url.rpartition("@")
        try:
            rest = urlsplit("//" + after)
        except ValueError:
            return "***"
        netloc = "***@" + rest.netloc
        return urlunsplit((parts.scheme, netloc, rest.path, _redact_query(rest.query),
                           rest.fragment))
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:***@{hostport}" if colon else f"***@{hostport}"
    return urlunsplit((parts.scheme, netloc, parts.path, _redact_query(parts.query),
                       parts.fragment))


def _redact_query(query: str) -> str:
    """Every value of ``query`` as ``***`` (a bare item too: it may be a token)."""
    return "&".join(f"{item.split('=', 1)[0]}=***" if "=" in item else "***"
                    for item in query.split("&")) if query else ""


def _userinfo_cut_short(url: str, parts: SplitResult) -> bool:
    """Whether ``url`` holds a userinfo its netloc does not: a password with an unencoded
    '/', '?' or '#' (base64 has '/') ends the netloc early (``redis://:pa/ss@host`` splits
    as netloc ``:pa``, path ``/ss@host``), and a URL without ``//`` (``redis:/:pw@host``,
    ``user:pw@host``) has no netloc at all. A path's '@' under a readable host (or
    ``file:///a@b``, or a bare path) is no userinfo."""
    if "@" not in url or "@" in parts.netloc or url.lstrip(_C0_OR_SPACE).startswith("/"):
        return False
    return _bad_host(parts) if parts.netloc else not _has_authority(url, parts.scheme)


def _has_authority(url: str, scheme: str) -> bool:
    """Whether ``url`` has ``//`` after its scheme (``file:///a@b`` has, with an empty
    host: an '@' in its path is no userinfo)."""
    # As urlsplit reads it: leading controls and spaces dropped, tabs and newlines gone.
    text = url.lstrip(_C0_OR_SPACE).translate(_UNSAFE)
    return text[len(scheme) + 1 if scheme else 0:].startswith("//")


def _bad_host(parts: SplitResult) -> bool:
    """Whether ``parts`` has no host, or a port that is not a number (the netloc is then
    the start of a userinfo the parser cut short)."""
    try:
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
    except ValueError:
        return True
    return not parts.hostname


def unreadable_host_problem(name: str, url: str) -> str | None:
    """Why ``url`` (setting ``name``) cannot be used: its host or port cannot be read, as
    when a password holds an unencoded '/', '?' or '#', or it has a userinfo but no
    ``//``. None when it can. The message
    quotes nothing of the URL: a client library's error would (redis-py's "Port could not
    be cast to integer value as '<start of the password>'")."""
    try:
        parts = urlsplit(url)
        bad = (bool(parts.netloc) and _bad_host(parts)) or _userinfo_cut_short(url, parts)
    except ValueError:
        bad = True
    if not bad:
        return None
    return (f"{name} is not a valid URL (its host or port cannot be read): percent-encode "
            "'/', '?', '#' and '@' in its user name and password (a password 'a/b' is written "
            "a%2Fb)")


def redact_urls(doc: Any) -> Any:
    """``doc`` (JSON data) with every value under a ``URL_KEYS`` key redacted."""
    if isinstance(doc, dict):
        return {k: (redact_url(v) if k in URL_KEYS and isinstance(v, str) else redact_urls(v))
                for k, v in doc.items()}
    if isinstance(doc, list):
        return [redact_urls(v) for v in doc]
    return doc


def readable_redis_url(v: str | None) -> str | None:
    """A ``redis_url`` setting's validator: refuses a URL whose host or port cannot be read
    (a password with an unencoded '/') without quoting it; redis-py's error would quote
    the start of the password into the log."""
    if v is not None and (problem := unreadable_host_problem("KUBEINFER_REDIS_URL", v)):
        raise ValueError(problem)
    return v
