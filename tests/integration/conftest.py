"""Integration tests start real servers and processes on free 127.0.0.1 ports."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.redis_server import RedisServer, start_redis


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server for a module's tests (a module that kills or restarts it, or
    needs it persistent, defines its own)."""
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()
