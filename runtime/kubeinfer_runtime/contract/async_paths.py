"""Where an async endpoint wrote before its outputPath changed: the workers still may.

Why this exists: the gateway answers an accepted async request with its
``OutputLocation`` and ``FailureLocation``, computed from ``spec.async.outputPath``
and ``failurePath`` as they are then. A worker writes only below its endpoint's
paths (``queue.request.Confinement``: whoever can write to Redis could otherwise
make it write anywhere), so when the spec changed those paths, every request
still queued was dead-lettered without an output or a failure object at the
locations its caller was given: accepted work lost without a word. SageMaker
finishes in-flight requests under the configuration they were accepted with.

So the operator (and local mode) hand the async workers the pairs the endpoint
used before (``KUBEINFER_FORMER_PATHS``, JSON), each until ``FORMER_PATHS_GRACE_S``
after it was replaced: twice the longest RequestTTLSeconds, so a request accepted
just before the change is written, or fails as expired, where its caller looks.
A request is written under a former pair only when both its locations are below
that pair, as the gateway made them. At most ``FORMER_PATHS_KEEP`` pairs are kept.

``carry_former_paths`` is the one rule both sides apply (PURE): the pair being
replaced joins the former ones, the new current pair leaves them, and a pair
keeps the ``until`` it got when it was first replaced (so re-rendering the same
change rolls nothing).
"""

from __future__ import annotations

import json

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from kubeinfer_runtime.contract import ASYNC_MAX_REQUEST_TTL_S

#: Env of the async worker holding the former pairs (JSON list).
FORMER_PATHS_ENV = "KUBEINFER_FORMER_PATHS"
#: How long a replaced pair stays writable, seconds.
FORMER_PATHS_GRACE_S = 2 * ASYNC_MAX_REQUEST_TTL_S
#: Most pairs kept (the latest replaced).
FORMER_PATHS_KEEP = 4


class FormerAsyncPaths(BaseModel):
    """An outputPath and failurePath an endpoint had, writable until ``until`` (epoch s)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    outputPath: str = Field(min_length=1, max_length=2048)
    failurePath: str = Field(min_length=1, max_length=2048)
    until: float


_LIST = TypeAdapter(list[FormerAsyncPaths])


def parse_former_paths(text: str) -> list[FormerAsyncPaths]:
    """``KUBEINFER_FORMER_PATHS``' pairs; ValueError naming the setting when malformed."""
    if not text.strip():
        return []
    try:
        return _LIST.validate_json(text)
    except ValidationError:
        raise ValueError(f"{FORMER_PATHS_ENV} is not a JSON list of {{outputPath, "
                         "failurePath, until}}: the operator writes it; remove it") from None


def render_former_paths(pairs: list[FormerAsyncPaths]) -> str:
    return json.dumps([p.model_dump() for p in pairs], separators=(",", ":"))


def carry_former_paths(previous: tuple[str, str] | None, former: list[FormerAsyncPaths],
                       current: tuple[str, str], now: float) -> list[FormerAsyncPaths]:
    """The former pairs once the endpoint's (outputPath, failurePath) is ``current``:
    ``previous`` (what the workers had) joins ``former`` unless it is ``current``; the
    current pair is dropped from them; the latest ``FORMER_PATHS_KEEP`` stay (PURE)."""
    kept = {(p.outputPath, p.failurePath): p for p in former}
    if previous is not None and previous != current and previous not in kept:
        kept[previous] = FormerAsyncPaths(outputPath=previous[0], failurePath=previous[1],
                                          until=now + FORMER_PATHS_GRACE_S)
    kept.pop(current, None)
    latest = sorted(kept.values(), key=lambda p: p.until, reverse=True)[:FORMER_PATHS_KEEP]
    return sorted(latest, key=lambda p: p.until)
