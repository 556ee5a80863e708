"""How the edge agent and the fleet controller ride out trouble that passes by itself: a
package download that fails on the network or a busy fleet server is tried again
(``retry_delay``); a heartbeat loop that ends on an error it does not expect stops the
agent (exit 1, so the service manager restarts it) instead of leaving a device that serves
but never reports; one slow controller tick does not stall the next ones."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from pathlib import Path

import pytest

from kubeinfer_runtime.edge import agent as agent_mod
from kubeinfer_runtime.edge.agent_install import INSTALL_ATTEMPTS, retry_delay


def test_transient_failures_are_retried_with_growing_delays_then_fail() -> None:
    delays = [retry_delay(n) for n in range(1, INSTALL_ATTEMPTS + 1)]
    assert delays[-1] is None  # the last try fails the version for good
    waits = [d for d in delays[:-1] if d is not None]
    assert len(waits) == INSTALL_ATTEMPTS - 1
    assert waits == sorted(waits) and waits[0] >= 1.0 and waits[-1] <= 60.0
    assert retry_delay(INSTALL_ATTEMPTS + 3) is None


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_heartbeat_loop_that_dies_stops_the_agent_with_exit_1(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken_loop(self: agent_mod.Agent) -> None:
        raise RuntimeError("a bug the loop does not expect")

    monkeypatch.setattr(agent_mod.Agent, "loop", broken_loop)
    config = agent_mod.AgentConfig(server="http://127.0.0.1:9", device_id="d1",
                                   target="native", state_dir=tmp_path / "state",
                                   listen_port=_port())
    code = await asyncio.wait_for(agent_mod._main(config), 60)
    assert code == 1
    assert "heartbeat loop stopped (RuntimeError: a bug the loop does not expect)" in \
        caplog.text


async def test_a_stop_signal_still_exits_0(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    started = asyncio.Event()

    async def idle_loop(self: agent_mod.Agent) -> None:
        started.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(agent_mod.Agent, "loop", idle_loop)
    config = agent_mod.AgentConfig(server="http://127.0.0.1:9", device_id="d1",
                                   target="native", state_dir=tmp_path / "state",
                                   listen_port=_port())
    main = asyncio.create_task(agent_mod._main(config))
    await asyncio.wait_for(started.wait(), 60)
    os.kill(os.getpid(), signal.SIGTERM)  # the agent's handler (on this loop) takes it
    assert await asyncio.wait_for(main, 60) == 0


def test_one_slow_tick_does_not_stretch_the_controllers_next_pause() -> None:
    from kubeinfer_runtime.edge.controller import TICK_WINDOW, tick_pause

    assert tick_pause([], 1.0) == 1.0
    quick = [0.01] * (TICK_WINDOW - 1)
    # A hiccup (a busy CPU, a slow Redis answer): the fleet's typical tick decides.
    assert tick_pause([*quick, 3.0], 1.0) == 1.0
    # A big fleet whose ticks are all long: they stay a tenth of the server's time.
    assert tick_pause([0.5] * TICK_WINDOW, 1.0) == pytest.approx(4.5)
