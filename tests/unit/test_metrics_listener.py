"""The metrics port's handler (``metrics_listener``) in-process, with a stand-in writer:
a client that never reads the answer is dropped after ``HEAD_TIMEOUT_S``, not held."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from kubeinfer_runtime import metrics_listener


class _Transport:
    def __init__(self) -> None:
        self.aborted = False

    def get_write_buffer_size(self) -> int:
        return 0 if self.aborted else 1 << 20  # the answer sits unread

    def abort(self) -> None:
        self.aborted = True


class StuckWriter:
    """A connection whose peer never reads: drain and a graceful close never finish."""

    def __init__(self) -> None:
        self.transport = _Transport()
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    async def drain(self) -> None:
        await asyncio.Event().wait()

    def close(self) -> None:
        pass

    async def wait_closed(self) -> None:
        if not self.transport.aborted:
            await asyncio.Event().wait()


@pytest.mark.timeout(20)  # without the bound, the handler waits forever
async def test_a_client_that_never_reads_the_answer_is_dropped(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_listener, "HEAD_TIMEOUT_S", 0.1)
    reader = asyncio.StreamReader()
    reader.feed_data(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    writer: Any = StuckWriter()
    await asyncio.wait_for(metrics_listener._handle(reader, writer), 2)
    assert writer.written > 0 and writer.transport.aborted
