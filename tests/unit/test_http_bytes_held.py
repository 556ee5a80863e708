"""How ``http_limits`` derives a process's bound on request bytes held from its memory,
and when its send check calls a peer stalled.

The bound itself (refusals, release on answer and on close) is driven over real sockets
in tests/integration/test_connection_limits.py.
"""

from __future__ import annotations

import asyncio

import pytest

from kubeinfer_runtime.http_limits import (
    MIN_AUTO_BYTES_HELD,
    auto_max_bytes_held,
    parse_cgroup_memory_limit,
)
from tests.support.limited_protocol import answering

MiB = 1024 * 1024
GiB = 1024 * MiB


@pytest.mark.parametrize(("text", "expected"), [
    ("536870912\n", 512 * MiB),      # cgroup v2 memory.max of a 512Mi container
    ("max\n", None),                 # v2 without a limit
    ("9223372036854771712\n", None),  # v1's "no limit": 2**63 rounded down to a page
    ("", None),
    ("garbage", None),
    ("-1", None),
])
def test_a_cgroup_limit_file_is_read_as_bytes_or_no_limit(text: str,
                                                          expected: int | None) -> None:
    assert parse_cgroup_memory_limit(text) == expected


def test_a_quarter_of_the_memory_limit_at_least_the_floor() -> None:
    assert auto_max_bytes_held(512 * MiB, 16 * GiB) == 128 * MiB  # the gateway's default
    assert auto_max_bytes_held(None, 16 * GiB) == 4 * GiB  # no cgroup limit: the machine
    # A limit above the machine's memory (a cgroup set too high) is the machine's.
    assert auto_max_bytes_held(64 * GiB, 16 * GiB) == 4 * GiB
    # A tiny container still holds a few largest real-time bodies.
    assert auto_max_bytes_held(32 * MiB, 16 * GiB) == MIN_AUTO_BYTES_HELD
    assert 2 * 6 * MiB <= MIN_AUTO_BYTES_HELD


def test_a_streamed_answer_read_steadily_is_never_cut() -> None:
    """1 MiB chunks read at 1 MiB per 1.02 s, looked at every second: each look lands a
    little earlier on the buffer's sawtooth (drained, then refilled by the next chunk),
    so higher than the last for 50 looks in a row, though the peer took a chunk between
    any two. Before, that was "took nothing" and the connection was cut after 30 s."""
    async def run() -> None:
        proto, transport = answering()
        timeout = proto.limits.http_send_timeout_s
        chunk, low, period = MiB, 16 * 1024, 1.02
        start = asyncio.get_running_loop().time()
        for look in range(int(3 * timeout)):
            phase = (look % period) / period  # how far this chunk has drained
            transport.pending = low + round(chunk * (1 - phase))
            proto.check_deadline(start + look)
            assert not transport.aborted, f"cut at look {look}"
        # A peer that takes nothing is still cut.
        for look in range(int(3 * timeout), int(5 * timeout)):
            proto.check_deadline(start + look)
        assert transport.aborted
        for task in proto.tasks:
            task.cancel()
    asyncio.run(run())

