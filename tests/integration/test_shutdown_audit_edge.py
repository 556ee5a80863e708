"""An edge agent stopped by SIGTERM answers the requests its listener has taken first.

The agent's proxy forwards each request to the device's model server (a child). On
SIGTERM it must stop taking requests, let the ones it has taken finish, and only then
stop the model server: stopping the child first answers them 503, work lost.
"""

from __future__ import annotations

import json
import signal
import socket
from pathlib import Path

from tests.integration.test_edge_agent import (  # noqa: F401  (``fleet`` is a fixture)
    Built,
    fleet,
    invoke,
    start_agent,
    wait_deployed,
)
from tests.support.onnx_models import scale_sum_model
from tests.support.ports import stop_process, wait_until


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


def _reply(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_sigterm_answers_a_request_being_received_before_stopping_the_model(
        fleet: Built, tmp_path: Path) -> None:  # noqa: F811
    agent = start_agent(fleet, tmp_path / "state")
    try:
        fleet.publish("v1", scale_sum_model(tmp_path / "m1.onnx", 1.0))
        wait_deployed(fleet, agent, "v1", "Succeeded")
        assert invoke(agent, [[1, 2]]) == [3.0]
        body = json.dumps([[1, 2]]).encode()
        with socket.create_connection(("127.0.0.1", agent.port), timeout=30) as sock:
            # Taken by the listener, its body still arriving when SIGTERM comes.
            sock.sendall(b"POST /invocations HTTP/1.1\r\nHost: device\r\n"
                         b"Content-Type: application/json\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
                         + body[:2])
            agent.proc.send_signal(signal.SIGTERM)
            wait_until(lambda: _refused(agent.port), 15, "the agent to stop taking requests")
            sock.sendall(body[2:])
            reply = _reply(sock)
        assert reply.startswith(b"HTTP/1.1 200"), reply[:300] + agent.text()[-3000:].encode()
        assert agent.proc.wait(30) == 0, agent.text()
    finally:
        stop_process(agent.proc)
