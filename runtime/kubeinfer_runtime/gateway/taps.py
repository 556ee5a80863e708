"""Taps: what sees a copy of each answered invocation, off the client's path.

After a model server answers an invocation, ``proxy.InvocationHandler.reply``
makes one :class:`Exchange` and hands it to each tap of the endpoint
(``EndpointState.taps``), then returns the response to the client. That is the
only call site; the inline (``inline_http``) and the ASGI paths both go
through ``reply``. Endpoints without taps pay one falsy attribute check: the
``Exchange`` is only built when a tap is there.

The contract of a tap (``Tap.observe``) is strict, because it runs on the
event loop between the model's answer and the client's:

* never block: no I/O, no awaiting, no locks held for long. Do small, bounded
  work (a sampling draw, an append to a bounded deque, a ``put_nowait`` on a
  bounded queue; capture encodes a record of at most a few KiB, cheaper there
  than later, cold) and let a background task do the rest;
* never raise: a tap's failure must not change the client's answer (the
  call site still guards it, and logs the first failure of each tap type);
* never hold unbounded memory: when the background side falls behind, drop
  (the oldest or the newest, as fits) and count what was dropped;
* never log or quote the captured bytes (they are the caller's data).

Where taps come from: ``GatewayCore.apply`` compiles the route table, then
asks each tap provider for an endpoint's taps (data capture:
``capture_writer.CaptureTaps.apply``; shadows and mirrors:
``shadow.ShadowTaps.apply``) and sets ``EndpointState.taps``. A provider keeps
its taps across reloads (so buffers survive a new revision) and drains them
when an endpoint goes away.

A ``shadow.ShadowTap`` samples and ``put_nowait``s the exchange on a bounded
per-shadow queue, dropped and counted when full; a worker task sends the copy
to the shadow with its own timeout and compares its answer with
``exchange.response_body``. The ``event_id`` pairs the production record with
the shadow's (capture writes it as ``eventMetadata.eventId``).
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections.abc import Sequence
from typing import NamedTuple, Protocol

from kubeinfer_runtime.contract import H_CUSTOM_ATTRIBUTES, H_INFERENCE_ID

log = logging.getLogger("kubeinfer.gateway")

_CONTENT_TYPE = b"content-type"
_ACCEPT = b"accept"
_INFERENCE_ID = H_INFERENCE_ID.encode()
_CUSTOM_ATTRIBUTES = H_CUSTOM_ATTRIBUTES.encode()


class Exchange(NamedTuple):
    """One answered invocation: the request as forwarded, the model server's answer.

    Immutable and shared by every tap of the endpoint: taps must not expect
    a copy of their own. A tuple, built on the request path of every endpoint
    with taps: the request's header values are read from ``forwarded`` when a
    tap asks (most copies are only queued), decoded as latin-1 (what HTTP
    carries), None when the client sent none.
    """

    endpoint: str
    variant: str
    request_body: bytes
    status: int
    response_body: bytes
    response_content_type: str | None
    #: The upstream round trip (the model server's time plus the hop), seconds.
    upstream_latency_s: float
    #: A uuid4 naming this exchange (capture's eventId; pairs shadow and production).
    event_id: str
    #: Wall time (``time.time()``) when the answer arrived.
    wall_time: float
    #: The headers sent upstream (the gateway's allowlist, ``headers.FORWARDED``): what a
    #: shadow's copy is sent with (TargetModel and TargetContainerHostname included).
    forwarded: tuple[tuple[bytes, bytes], ...] = ()

    def _header(self, name: bytes) -> str | None:
        for key, value in self.forwarded:
            if key == name:
                return value.decode("latin-1")
        return None

    @property
    def request_content_type(self) -> str | None:
        return self._header(_CONTENT_TYPE)

    @property
    def accept(self) -> str | None:
        return self._header(_ACCEPT)

    @property
    def inference_id(self) -> str | None:
        """X-Amzn-SageMaker-Inference-Id, as the client sent it."""
        return self._header(_INFERENCE_ID)

    @property
    def custom_attributes(self) -> str | None:
        """X-Amzn-SageMaker-Custom-Attributes, as the client sent it."""
        return self._header(_CUSTOM_ATTRIBUTES)


class Tap(Protocol):
    """Sees every answered invocation of the endpoints it is attached to.

    ``observe`` runs on the event loop before the client gets its answer: it
    must not block, raise or await (see the module's docstring).
    """

    def observe(self, exchange: Exchange) -> None: ...


def make_exchange(endpoint: str, variant: str, forwarded: Sequence[tuple[bytes, bytes]],
                  body: bytes, status: int, response_body: bytes,
                  response_content_type: bytes | None, upstream_s: float) -> Exchange:
    """The :class:`Exchange` of a request (``forwarded``: the headers sent upstream)."""
    return Exchange(endpoint, variant, body, status, response_body,
                    (response_content_type.decode("latin-1")
                     if response_content_type is not None else None),
                    upstream_s, new_event_id(), time.time(), tuple(forwarded))


class EventIds:
    """uuid4-shaped event ids at a fraction of ``uuid.uuid4()``'s cost on the request path.

    A random 80-bit prefix per process, with the version (4) and variant bits of a
    uuid4, and a 48-bit counter as the last group: unique within the process, and
    across gateway replicas as far as 80 random bits go. ``str(uuid.uuid4())`` costs
    ~2 µs per request (a syscall for 16 random bytes); this costs a format.
    """

    def __init__(self) -> None:
        head = uuid.uuid4().hex
        self._prefix = f"{head[:8]}-{head[8:12]}-{head[12:16]}-{head[16:20]}-"
        self._next = itertools.count(int(head[20:], 16))

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._next) & 0xFFFFFFFFFFFF:012x}"


new_event_id = EventIds()

_failed: set[type] = set()


def observe_all(taps: Sequence[Tap], exchange: Exchange) -> None:
    """Give ``exchange`` to each tap; a tap that raises (a bug) is logged once per type
    and never changes the client's answer nor stops the other taps."""
    for tap in taps:
        try:
            tap.observe(exchange)
        except Exception:
            kind = type(tap)
            if kind not in _failed:
                _failed.add(kind)
                log.exception("Tap %s failed on endpoint %s (reported once): the client's "
                              "answer is unaffected; report a bug", kind.__name__,
                              exchange.endpoint)
