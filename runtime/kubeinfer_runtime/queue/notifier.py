"""Webhook notifications of finished async requests (SageMaker's SNS topics).

A notification is POSTed with retries and exponential backoff before the
request is acknowledged, so it is delivered at least once: after a worker dies
between the POST and the XACK, the request is reclaimed and the notification
sent again. Receivers deduplicate by ``inferenceId``.

aiohttp rather than httpx: on every request httpcore re-tries importing an
optional module (sniffio), which cost the worker a tenth of its CPU here.

The webhook URLs come from the Endpoint's author, so every POST obeys the
outbound policy (``contract.outbound``): the URL is checked first, the
connection goes through the guarded connector (no link-local, metadata or
API-server address, however the name resolves) and redirects are never
followed (a 3xx is a failed delivery). A refused URL is not retried: it fails
the delivery at once, logged once per URL. URLs are logged redacted. Only
the reply's status counts: at most ``MAX_REPLY_BYTES`` of its body is read.

:meth:`Notifier.deliver` says how a delivery ended, so the worker can tell a
receiver that is down (connection refused, timeout, 5xx, 429: an outage, which
does not use up the request's attempts within the transient budget) from one
that refuses the notification (3xx, 4xx, a refused destination).
"""

from __future__ import annotations

import asyncio
import logging
from enum import StrEnum

import aiohttp

from kubeinfer_runtime.contract.outbound import (
    OutboundPolicy,
    OutboundRefused,
    redact_url,
    url_problem,
)
from kubeinfer_runtime.contract.outbound_io import guarded_connector

log = logging.getLogger("kubeinfer.queue")

#: At most this much of a webhook's reply is read (and dropped): its status is all that
#: counts, and a receiver answering an endless body must not hold the worker or its memory.
MAX_REPLY_BYTES = 64 * 1024


def backoff_s(attempt: int, first_s: float, cap_s: float = 30.0) -> float:
    """Delay before retry ``attempt`` (1-based): first_s, 2*first_s, 4*first_s, ... capped."""
    return float(min(first_s * (2 ** (attempt - 1)), cap_s))


class Delivery(StrEnum):
    DELIVERED = "delivered"
    #: Not reachable, timed out, or answered 5xx / 429: worth trying again later.
    UNREACHABLE = "unreachable"
    #: Answered 3xx or 4xx: the receiver does not take it.
    REJECTED = "rejected"
    #: The outbound policy refuses the destination: nothing was sent.
    REFUSED = "refused"


def _describe(error: BaseException) -> str:
    """An error for the log, without the URL some aiohttp errors quote (it may hold secrets)."""
    if isinstance(error, aiohttp.ClientResponseError):
        return f"{type(error).__name__}: {error.status} {error.message}"
    if isinstance(error, aiohttp.InvalidURL):
        return type(error).__name__
    return f"{type(error).__name__}: {error}"


async def _drain(response: aiohttp.ClientResponse) -> None:
    """Read and drop the reply, up to ``MAX_REPLY_BYTES``: a short reply read to its end
    leaves the connection for the next POST; a longer one is cut (the connection closes)."""
    left = MAX_REPLY_BYTES
    while left > 0 and (chunk := await response.content.read(left)):
        left -= len(chunk)


class Notifier:
    def __init__(self, *, policy: OutboundPolicy, attempts: int, backoff_first_s: float,
                 timeout_s: float = 10.0, connections: int = 16) -> None:
        #: Which destinations webhooks may reach (``KUBEINFER_OUTBOUND_ALLOW``).
        self.policy = policy
        self.attempts = attempts
        self.backoff_first_s = backoff_first_s
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.connections = connections
        self._session: aiohttp.ClientSession | None = None
        #: Refused URLs already logged (a refusal is logged once per URL).
        self._refused: set[str] = set()

    def _client(self) -> aiohttp.ClientSession:
        # Created lazily: a session must be made inside the running loop.
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=self.timeout,
                connector=guarded_connector(self.policy, limit=self.connections))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def send(self, url: str, body: bytes, inference_id: str) -> bool:
        """POST ``body`` to ``url``; True once a 2xx came back, False after every attempt.

        False at once, without a connection, when the outbound policy refuses ``url``.
        """
        return await self.deliver(url, body, inference_id) is Delivery.DELIVERED

    async def deliver(self, url: str, body: bytes, inference_id: str) -> Delivery:
        """As :meth:`send`, saying how the last attempt ended."""
        if (problem := url_problem(url, self.policy, "Notification webhook")) is not None:
            return self._refuse(url, inference_id, problem)
        headers = {"content-type": "application/json",
                   "x-amzn-sagemaker-inference-id": inference_id}
        shown = redact_url(url)
        outcome = Delivery.UNREACHABLE
        for attempt in range(1, self.attempts + 1):
            try:
                async with self._client().post(url, data=body, headers=headers,
                                               allow_redirects=False) as response:
                    await _drain(response)
                    if 200 <= response.status < 300:
                        return Delivery.DELIVERED
                    detail = f"HTTP {response.status}"
                    if 300 <= response.status < 400:
                        detail += " (redirects are not followed)"
                    down = response.status >= 500 or response.status == 429
                    outcome = Delivery.UNREACHABLE if down else Delivery.REJECTED
            except aiohttp.ClientConnectorError as e:
                if isinstance(e.os_error, OutboundRefused):  # resolved to a refused address
                    return self._refuse(url, inference_id, str(e.os_error))
                detail = _describe(e)
                outcome = Delivery.UNREACHABLE
            except (aiohttp.ClientError, TimeoutError) as e:
                detail = _describe(e)
                outcome = Delivery.UNREACHABLE
            if attempt < self.attempts:
                delay = backoff_s(attempt, self.backoff_first_s)
                log.warning("Notification of %s to %s failed (%s): retry %d in %.1fs",
                            inference_id, shown, detail, attempt, delay)
                await asyncio.sleep(delay)
            else:
                log.error("Notification of %s to %s failed %d times (%s): the request stays "
                          "pending and is notified again when reclaimed", inference_id, shown,
                          self.attempts, detail)
        return outcome

    def _refuse(self, url: str, inference_id: str, problem: str) -> Delivery:
        """A refused destination fails the delivery for good: no retries, one log line per URL."""
        if url not in self._refused:
            self._refused.add(url)
            log.error("Notification of %s not sent: %s; the request stays pending until it is "
                      "dead-lettered after maxRetries reclaims", inference_id, problem)
        else:
            log.debug("Notification of %s not sent: %s", inference_id, problem)
        return Delivery.REFUSED
