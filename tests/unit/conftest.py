"""Unit tests are guarded: no network at all, no kubeconfig, no cloud credentials.

Any attempt to open a connection (to a real cluster, Redis or S3) fails loudly,
so a unit test can never depend on something running on the machine.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest


class NetworkAccessInUnitTest(RuntimeError):
    pass


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def refuse(self: socket.socket, address: Any, *args: Any) -> Any:
        if self.family == socket.AF_UNIX:
            return real_connect(self, address, *args)
        raise NetworkAccessInUnitTest(
            f"unit test tried to connect to {address!r}: move it to tests/integration"
        )

    real_connect = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setenv("KUBECONFIG", "/nonexistent/kubeconfig-blocked-in-unit-tests")
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL",
                "KUBEINFER_S3_ENDPOINT_URL", "REDIS_URL"):
        monkeypatch.delenv(var, raising=False)
    yield
