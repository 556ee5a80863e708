"""Which operator replica is the active one: PURE.

kubeinfer runs HA as kopf peering with a distinct priority per replica: every
replica writes a heartbeat ``{priority, lastseen, lifetime}`` under its identity
into the peering object's ``status``, and kopf pauses every replica that sees a
live peer of higher priority (or of equal priority: a tie pauses both). The
operator's own HTTP endpoints (the scaler) are not kopf handlers, so kopf's
pause does not reach them; they ask this module the same question kopf answers,
from the same object, so a standby never acts on a scale request.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def live_peers(status: Mapping[str, Any], now: datetime) -> dict[str, int]:
    """Identity → priority of every peer whose heartbeat has not expired at ``now``."""
    out: dict[str, int] = {}
    for identity, info in status.items():
        if not isinstance(info, Mapping):
            continue  # a peer that said goodbye (kopf writes null)
        seen = _parse_time(info.get("lastseen"))
        if seen is None:
            continue
        try:
            lifetime = float(info.get("lifetime", 60))
            priority = int(info.get("priority", 0))
            # A hostile or garbled heartbeat (lifetime inf/NaN/1e12, priority inf) would
            # raise here; it counts as no peer rather than stopping the role check.
            expires = seen + timedelta(seconds=lifetime)
        except (TypeError, ValueError, OverflowError):
            continue
        if expires <= now:
            continue
        out[str(identity)] = priority
    return out


def is_active(status: Mapping[str, Any] | None, identity: str, priority: int,
              now: datetime) -> bool:
    """Whether the replica ``identity`` of ``priority`` is the one kopf lets act.

    Mirrors kopf's rule: paused while another live peer has a higher priority or the
    same one. A peering object with no heartbeat of ours yet (start-up) counts the
    same way: we are active only if no other live peer outranks or ties us.
    """
    others = {ident: prio for ident, prio in live_peers(status or {}, now).items()
              if ident != identity}
    return all(prio < priority for prio in others.values())
