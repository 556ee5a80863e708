"""Health of the upstream model servers: PURE state machine, no I/O.

Two kinds of evidence feed it:

* active checks: the checker loop (``gateway.checker``) GETs each upstream's
  ``/ping`` every ``health_interval_s`` and records the outcome here;
* passive evidence: the hot path reports an upstream that refused or dropped a
  connection, which takes it out of rotation at once instead of after the next
  check.

An upstream nobody has checked yet counts as healthy (optimistic): the gateway
starts routing as soon as a route table appears, and a refused connection takes
a dead upstream out straight away. It goes down after ``fall`` failed checks in
a row (one blip under load should not drain a variant) and comes back after
``rise`` good ones. The hot path only reads ``down``, a set, so the common case
costs one membership test.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum


class Transition(StrEnum):
    WENT_DOWN = "went down"
    CAME_UP = "came up"


@dataclass(slots=True)
class _Record:
    up: bool = True
    fails: int = 0
    passes: int = 0


class HealthTable:
    """Up/down state of every tracked upstream URL."""

    def __init__(self, *, fall: int = 2, rise: int = 1) -> None:
        if fall < 1 or rise < 1:
            raise ValueError("fall and rise must be at least 1")
        self.fall = fall
        self.rise = rise
        #: URLs currently out of rotation. Read by the hot path.
        self.down: set[str] = set()
        self._records: dict[str, _Record] = {}

    def tracked(self) -> list[str]:
        return list(self._records)

    def is_up(self, url: str) -> bool:
        return url not in self.down

    def track(self, urls: Iterable[str]) -> list[str]:
        """Track exactly ``urls`` (a new route table); returns the newly added ones.

        Upstreams that stay keep their state, so a weight change does not reset
        what the gateway knows about a dead server.
        """
        wanted = set(urls)
        for gone in set(self._records) - wanted:
            del self._records[gone]
            self.down.discard(gone)
        added = [u for u in wanted if u not in self._records]
        for url in added:
            self._records[url] = _Record()
        return sorted(added)

    def record_check(self, url: str, ok: bool) -> Transition | None:
        """Record one active check; returns the transition it caused, if any."""
        rec = self._records.get(url)
        if rec is None:  # dropped from the table while the check ran
            return None
        if ok:
            rec.fails = 0
            rec.passes += 1
            if not rec.up and rec.passes >= self.rise:
                return self._set(url, rec, up=True)
            return None
        rec.passes = 0
        rec.fails += 1
        if rec.up and rec.fails >= self.fall:
            return self._set(url, rec, up=False)
        return None

    def mark_unreachable(self, url: str) -> Transition | None:
        """Passive evidence: a connection to ``url`` was refused or dropped."""
        rec = self._records.get(url)
        if rec is None:
            return None
        rec.passes = 0
        rec.fails = max(rec.fails, self.fall)
        if rec.up:
            return self._set(url, rec, up=False)
        return None

    def _set(self, url: str, rec: _Record, *, up: bool) -> Transition:
        rec.up = up
        if up:
            self.down.discard(url)
            return Transition.CAME_UP
        self.down.add(url)
        return Transition.WENT_DOWN
