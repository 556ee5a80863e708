"""Keeps each namespace's Redis user in the operator's Redis (``ACL SETUSER``).

The rules are ``render.redis_users`` (pure); this module only sends them. Users
set with ``ACL SETUSER`` live in the server's memory: a Redis restarted without
an ACL file forgets them, and the namespace's gateways and workers then get
``WRONGPASS``. So a user is not sent once but re-sent whenever its namespace
was last ensured more than ``RECHECK_S`` ago (``redis_acl_recheck_s``; async
Endpoints are evaluated by the scaler every few seconds, so a forgotten user is
back within about a minute). ``reset`` in the
rules makes sending them again harmless, and it keeps the connections already
authenticated as the user (checked on Redis 7.0).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from kubeinfer_operator.render import redis_users

log = logging.getLogger("kubeinfer.operator")

#: Seconds a namespace's user counts as in place after it was set.
RECHECK_S = 60.0


class RedisAclUnavailable(Exception):
    """This Redis refuses to keep users for the operator (no ACL, or no right to set
    them); the message says what to change."""


class RedisUsers:
    """The operator's side of the namespace users: one admin connection, made on first use."""

    def __init__(self, admin_url: str, *, recheck_s: float = RECHECK_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.admin_url = admin_url
        self.recheck_s = recheck_s
        self.clock = clock
        self._client: Any = None
        #: namespace -> when its user was last set.
        self._ensured: dict[str, float] = {}

    async def ensure(self, namespace: str) -> bool:
        """Set ``namespace``'s user unless that was done less than ``recheck_s`` ago;
        True when it was sent now.

        Raises ``RedisAclUnavailable`` when the server refuses the command, and
        redis-py's ``ConnectionError``/``TimeoutError`` when it cannot be reached
        (the caller retries later; nothing is remembered)."""
        import redis.asyncio
        import redis.exceptions

        now = self.clock()
        last = self._ensured.get(namespace)
        if last is not None and now - last < self.recheck_s:
            return False
        if self._client is None:
            self._client = redis.asyncio.from_url(self.admin_url, decode_responses=True)
        name = redis_users.user(namespace)
        try:
            await self._client.execute_command(
                "ACL", "SETUSER", name, *redis_users.acl_rules(self.admin_url, namespace))
        except redis.exceptions.ResponseError as exc:
            # The message is the server's (NOPERM, unknown command): it names no secret.
            raise RedisAclUnavailable(
                f"Redis refused to set user {name} ({exc}): give the operator's Redis user "
                "the right to run ACL SETUSER (Redis 6 or later), or set the chart's "
                "runtime.redis.aclPerNamespace to false (every namespace then shares the "
                "operator's Redis credentials: one trust domain)") from None
        if last is None:
            log.info("Redis user %s set (keys %s)", name, redis_users.key_pattern(namespace))
        self._ensured[namespace] = now
        return True

    def forget(self, namespace: str) -> None:
        """Send ``namespace``'s user again at the next ``ensure``."""
        self._ensured.pop(namespace, None)

    async def drop(self, namespace: str) -> None:
        """Remove ``namespace``'s user (its last Endpoint is gone: the runtime Secret that
        names it goes too). Best effort: a Redis that refuses or cannot be reached keeps
        the user, logged; the next ``ensure`` sets it again either way."""
        import redis.asyncio

        self.forget(namespace)
        name = redis_users.user(namespace)
        try:
            if self._client is None:
                self._client = redis.asyncio.from_url(self.admin_url, decode_responses=True)
            if await self._client.execute_command("ACL", "DELUSER", name):
                log.info("Redis user %s removed: namespace %s has no Endpoint left", name,
                         namespace)
        except Exception as exc:  # redis-py's errors and OSErrors: nothing to hold for
            log.warning("Could not remove Redis user %s (%s); it stays until removed by "
                        "hand", name, type(exc).__name__)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
