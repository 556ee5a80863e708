"""Webhook notifications of finished async requests (SageMaker's SNS topics).

A notification is POSTed with retries and exponential backoff before the
request is acknowledged, so it is delivered at least once: after a worker dies
between the POST and the XACK, the request is reclaimed and the notification
sent again. Receivers deduplicate by ``inferenceId``.

aiohttp rather than httpx: on every request httpcore re-tries importing an
optional module (sniffio), which cost the worker a tenth of its CPU here.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp

log = logging.getLogger("kubeinfer.queue")


def backoff_s(attempt: int, first_s: float, cap_s: float = 30.0) -> float:
    """Delay before retry ``attempt`` (1-based): first_s, 2*first_s, 4*first_s, ... capped."""
    return float(min(first_s * (2 ** (attempt - 1)), cap_s))


class Notifier:
    def __init__(self, *, attempts: int, backoff_first_s: float, timeout_s: float = 10.0,
                 connections: int = 16) -> None:
        self.attempts = attempts
        self.backoff_first_s = backoff_first_s
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.connections = connections
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        # Created lazily: a session must be made inside the running loop.
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=self.timeout, connector=aiohttp.TCPConnector(limit=self.connections))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def send(self, url: str, body: bytes, inference_id: str) -> bool:
        """POST ``body`` to ``url``; True once a 2xx came back, False after every attempt."""
        headers = {"content-type": "application/json",
                   "x-amzn-sagemaker-inference-id": inference_id}
        for attempt in range(1, self.attempts + 1):
            try:
                async with self._client().post(url, data=body, headers=headers) as response:
                    await response.read()
                    if 200 <= response.status < 300:
                        return True
                    detail = f"HTTP {response.status}"
            except (aiohttp.ClientError, TimeoutError) as e:
                detail = f"{type(e).__name__}: {e}"
            if attempt < self.attempts:
                delay = backoff_s(attempt, self.backoff_first_s)
                log.warning("Notification of %s to %s failed (%s): retry %d in %.1fs",
                            inference_id, url, detail, attempt, delay)
                await asyncio.sleep(delay)
            else:
                log.error("Notification of %s to %s failed %d times (%s): the request stays "
                          "pending and is notified again when reclaimed", inference_id, url,
                          self.attempts, detail)
        return False
