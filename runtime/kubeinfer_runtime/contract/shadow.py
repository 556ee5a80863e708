"""Shadow variants and mirrors as the operator hands them to the gateway.

Both send a sampled copy of answered production requests to another fleet,
off the client's path (``gateway.shadow``), and compare the two answers
(``gateway.compare``):

* ``ShadowRoute`` (SageMaker ShadowProductionVariants): a fleet that takes no
  production traffic; ``EndpointRoute.shadows``. Its answers are discarded.
* ``MirrorRoute``: a copy of one production variant's requests (``source``)
  to another production variant (``peer``), e.g. blue to green during a
  guarded rollout, so the ``disagreement`` alarm can compare what the two
  predict on the same requests; ``EndpointRoute.mirrors``.

The gateway exports the comparison under the metric names below, labelled
``endpoint``, ``variant`` (the production variant that answered the client),
``peer`` (the shadow, or the mirror's peer variant) and, where said, ``side``
(``production`` or ``peer``) or ``result``. The operator reads them back by
these names (``reconcile.shadow_status``), so they live in the contract.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

#: Copies by outcome (``result``): ``sent`` (answered, whatever the status),
#: ``failed`` (no answer: refused, timed out, dropped connection, no upstream),
#: ``dropped`` (the peer's queue was full, by count or by bytes: never sent).
COPIES = "kubeinfer_shadow_copies_total"
#: Pairs whose two answers were both 2xx and comparable.
COMPARED = "kubeinfer_shadow_compared_total"
#: Pairs whose two answers were both 2xx but too large to compare (over the gateway's
#: ``compare.MAX_COMPARE_VALUES``) and not byte for byte equal: in no other count but
#: ``COPIES``'s ``sent``.
UNCOMPARED = "kubeinfer_shadow_uncompared_total"
#: Compared pairs that agreed (same labels / argmax, or values within tolerance).
AGREED = "kubeinfer_shadow_agreed_total"
#: Compared pairs that did not agree (``COMPARED`` minus ``AGREED``, exported as such so
#: a disagreement rate is one ratio of two counters).
DISAGREED = "kubeinfer_shadow_disagreed_total"
#: Error answers (status >= 400, or no answer) of each ``side`` of sampled requests.
ERRORS = "kubeinfer_shadow_errors_total"
#: Histogram of each ``side``'s latency (the upstream round trip), seconds.
LATENCY = "kubeinfer_shadow_latency_seconds"
#: Summary of each numeric pair's largest absolute difference.
ABS_DIFF = "kubeinfer_shadow_abs_diff"
#: Summary of each numeric pair's largest relative difference.
REL_DIFF = "kubeinfer_shadow_rel_diff"

SIDE_PRODUCTION = "production"
SIDE_PEER = "peer"

#: Longest a copy waits for its answer by default, seconds (``ShadowRoute.timeout_s``).
DEFAULT_TIMEOUT_S = 10.0
#: Copies waiting per peer by default; past it new copies are dropped and counted (as
#: they are past the gateway's byte bound, ``gateway.shadow.MAX_HELD_BYTES``).
DEFAULT_QUEUE_SIZE = 256
#: Copies in flight per model server of a peer by default (the peer's own connections, never
#: production's): a peer with N servers has N times as many workers.
DEFAULT_CONCURRENCY = 8


class _Peer(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)  # see contract._Strict

    #: Share of answered production requests copied, 0 to 100 (a random draw each).
    sampling_percentage: Annotated[float, Field(ge=0, le=100)] = 100.0
    timeout_s: Annotated[float, Field(gt=0)] = DEFAULT_TIMEOUT_S
    queue_size: Annotated[int, Field(ge=1, le=100_000)] = DEFAULT_QUEUE_SIZE
    concurrency: Annotated[int, Field(ge=1, le=1024)] = DEFAULT_CONCURRENCY


class ShadowRoute(_Peer):
    """One shadow variant: where copies go. Never chosen for a client's request."""

    name: str
    #: Base URLs of the shadow's model servers (as ``VariantRoute.upstreams``).
    upstreams: list[str] = Field(default_factory=list)
    discovery: Literal["static", "dns"] = "static"
    #: What the shadow's model servers run (their server hash). When it changes, the
    #: gateways start the shadow's comparison over: its counts describe one version.
    revision: str = ""


class MirrorRoute(_Peer):
    """Copies of ``source``'s answered requests to production variant ``peer``."""

    source: str
    peer: str
