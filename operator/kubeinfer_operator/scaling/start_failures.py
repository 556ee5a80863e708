"""Whether a variant's start failed, read for the operator's scale answers (I/O).

A gateway holding requests for a cold serverless variant POSTs ``/scale``
(``scaling.cluster``). When the variant's pods crash-loop, are OOMKilled or
cannot pull their image, no replica is coming soon; answering 202 made every
request wait the whole ``coldStartTimeout`` and then get a 503. Local mode's
scaler answers such a request 503 with a ``contract.scale.StartFailed`` body
instead, and the gateway then answers the requests it holds (and new ones,
until ``retry_after_s``) 503 at once with ``Retry-After``. The cluster scaler
does the same: once it has honoured a request (token, known variant, active
replica; the variant is marked requested and its scaling round scheduled, so
it is still scaled up and Kubernetes keeps restarting it), it asks
:class:`StartFailureLookups`, which reads the variant's model-server pods
(``k8s.pods.variant_start_failure``; ``reconcile.start_failure`` decides).

The answer names the kind of failure only, never a pod's messages or logs.
Reading the pods is bounded: at most one LIST per variant per
``LOOKUP_INTERVAL_S`` (concurrent requests share it, so a flood of valid
requests costs no more API calls), each within ``LOOKUP_TIMEOUT_S`` (below the
gateway's 2 s wait for the answer); a LIST that fails or is late answers as
before (202: the gateway holds).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable

from aiohttp import web

from kubeinfer_operator.reconcile.start_failure import StartFailure, start_failed_answer
from kubeinfer_runtime.contract.scale import START_FAILED_STATUS

log = logging.getLogger(__name__)

#: A variant's pods are read for scale requests at most this often, seconds.
LOOKUP_INTERVAL_S = 1.0
#: Longest wait for that read; later, the request is answered as usual (202).
LOOKUP_TIMEOUT_S = 1.0

Key = tuple[str, str, str]
#: (namespace, endpoint, variant) → whether that variant's latest start failed.
FindStartFailure = Callable[[str, str, str], Awaitable[StartFailure | None]]


class StartFailureLookups:
    """Each variant's latest start, read at most once per ``interval_s`` (callers
    meanwhile share the read), within ``timeout_s``."""

    def __init__(self, find: FindStartFailure, monotonic: Callable[[], float]) -> None:
        #: Reads a variant's pods and decides (tests put their own in).
        self.find = find
        self.monotonic = monotonic
        self.interval_s = LOOKUP_INTERVAL_S
        self.timeout_s = LOOKUP_TIMEOUT_S
        #: Each variant's latest read: when it started (``monotonic``) and its task.
        self._lookups: dict[Key, tuple[float, asyncio.Task[StartFailure | None]]] = {}

    async def get(self, namespace: str, endpoint: str, variant: str) -> StartFailure | None:
        """Whether the variant's latest start failed; None when not, or unknown."""
        now = self.monotonic()
        for key, (at, task) in list(self._lookups.items()):
            if task.done() and now - at >= self.interval_s:
                del self._lookups[key]
        key = (namespace, endpoint, variant)
        entry = self._lookups.get(key)
        if entry is None:
            entry = self._lookups[key] = (now, asyncio.create_task(self._look_up(key)))
        # Shielded: a caller that hangs up must not cancel the read the others wait for.
        return await asyncio.shield(entry[1])

    async def _look_up(self, key: Key) -> StartFailure | None:
        try:
            return await asyncio.wait_for(self.find(*key), self.timeout_s)
        except TimeoutError:
            problem = f"not read within {self.timeout_s:g}s"
        except Exception as exc:  # the answer stays the usual one; the next read retries
            problem = f"not readable: {type(exc).__name__}"
        log.warning("Variant %s of Endpoint %s/%s: its pods were %s; the scale request is "
                    "answered without checking for a failed start", key[2], key[0], key[1],
                    problem)
        return None

    def close(self) -> None:
        for _, task in self._lookups.values():
            task.cancel()
        self._lookups.clear()


def start_failed_response(failure: StartFailure, namespace: str, endpoint: str,
                          variant: str) -> web.Response:
    """The 503 a gateway reads as ``StartFailed`` (``Retry-After`` in whole seconds)."""
    body = start_failed_answer(failure, namespace, endpoint, variant)
    return web.json_response(
        body.model_dump(), status=START_FAILED_STATUS,
        headers={"Retry-After": str(max(1, math.ceil(failure.retry_after_s)))})
