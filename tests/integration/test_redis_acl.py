"""Namespace Redis users against a real redis-server (operator.redis_acl).

A namespace's user reaches its own queues and nothing else; a Redis restarted
without its users gets them back at the next check; a Redis that refuses ACL
changes is reported with what to change, never with a password.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import redis
import redis.exceptions

from kubeinfer_operator.redis_acl import RedisAclUnavailable, RedisUsers
from kubeinfer_operator.render import redis_users as ru
from kubeinfer_runtime.contract import AsyncQueueKeys
from tests.support.ports import free_port
from tests.support.redis_server import RedisServer, start_redis


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    s = start_redis(tmp_path_factory.mktemp("redis-acl"))
    yield s
    s.stop()


@pytest.fixture()
def run() -> Iterator[asyncio.Runner]:
    """One event loop per test: a RedisUsers' connection belongs to the loop it was made on."""
    with asyncio.Runner() as runner:
        yield runner


def _as(admin_url: str, namespace: str) -> redis.Redis:
    return redis.Redis.from_url(ru.namespace_url(admin_url, namespace), decode_responses=True)


def test_a_namespace_user_reaches_its_own_queues_only(
        server: RedisServer, run: asyncio.Runner) -> None:
    users = RedisUsers(server.url)
    assert run.run(users.ensure("team-a"))
    assert run.run(users.ensure("team-b"))
    a = _as(server.url, "team-a")
    mine = AsyncQueueKeys(queue="team-a.iris")
    theirs = AsyncQueueKeys(queue="team-b.iris")
    a.xadd(mine.stream, {"k": "v"})
    a.xgroup_create(mine.stream, mine.group, id="0", mkstream=True)
    assert a.xreadgroup(mine.group, "w1", {mine.stream: ">"}, count=1)
    a.hset(mine.inference("r1"), mapping={"state": "queued"})
    _as(server.url, "team-b").xadd(theirs.stream, {"k": "v"})
    for command in [("XADD", theirs.stream, "*", "k", "v"), ("XLEN", theirs.stream),
                    ("HGETALL", theirs.inference("r1")), ("GET", "some-other-app-key"),
                    ("KEYS", "*"), ("SCAN", "0"), ("RANDOMKEY",), ("DBSIZE",), ("FLUSHALL",),
                    ("CONFIG", "GET", "requirepass"), ("ACL", "LIST"), ("CLIENT", "LIST"),
                    ("MONITOR",), ("SCRIPT", "FLUSH"), ("FUNCTION", "FLUSH"),
                    ("PUBLISH", "c", "m"), ("EVAL", "return redis.call('xlen', ARGV[1])", "0",
                                            theirs.stream)]:
        with pytest.raises(redis.exceptions.ResponseError) as info:
            a.execute_command(*command)
        assert "permission" in str(info.value).lower() or "can't access" in str(info.value), (
            command, info.value)
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis.from_url(ru.namespace_url(server.url, "team-a").replace(
            ru.password(server.url, "team-a"), ru.password(server.url, "team-b")),
            decode_responses=True).ping()


def test_a_forgotten_user_is_set_again_at_the_next_check(
        server: RedisServer, run: asyncio.Runner) -> None:
    now = [100.0]
    users = RedisUsers(server.url, recheck_s=60, clock=lambda: now[0])
    assert run.run(users.ensure("team-c"))
    assert _as(server.url, "team-c").ping()
    admin = server.client()
    admin.execute_command("ACL", "DELUSER", ru.user("team-c"))  # as a restart would
    now[0] += 30
    assert not run.run(users.ensure("team-c"))  # checked 30 s ago: not sent again
    with pytest.raises(redis.exceptions.AuthenticationError):
        _as(server.url, "team-c").ping()
    now[0] += 31
    assert run.run(users.ensure("team-c"))
    assert _as(server.url, "team-c").ping()
    # Changed by hand: the next check puts the rules back whole.
    admin.execute_command("ACL", "SETUSER", ru.user("team-c"), "allkeys", "+@all")
    users.forget("team-c")
    assert run.run(users.ensure("team-c"))
    with pytest.raises(redis.exceptions.ResponseError):
        _as(server.url, "team-c").execute_command("GET", "not-a-queue-key")


def test_connections_already_open_survive_the_rules_being_sent_again(
        server: RedisServer, run: asyncio.Runner) -> None:
    users = RedisUsers(server.url, recheck_s=0)
    run.run(users.ensure("team-d"))
    conn = redis.Redis.from_url(ru.namespace_url(server.url, "team-d"),
                                single_connection_client=True)
    assert conn.ping()
    run.run(users.ensure("team-d"))
    assert conn.ping()  # the same connection, still authenticated


def test_a_redis_that_refuses_acl_changes_says_what_to_change(
        server: RedisServer, run: asyncio.Runner) -> None:
    admin = server.client()
    admin.execute_command("ACL", "SETUSER", "limited", "reset", "on", ">limited-pw",
                          "allkeys", "+@all", "-@admin")
    url = f"redis://limited:limited-pw@127.0.0.1:{server.port}/0"
    with pytest.raises(RedisAclUnavailable) as info:
        run.run(RedisUsers(url).ensure("team-e"))
    message = str(info.value)
    assert "ACL SETUSER" in message and "aclPerNamespace" in message
    assert "limited-pw" not in message and ru.password(url, "team-e") not in message


def test_an_unreachable_redis_is_retried_not_remembered(run: asyncio.Runner) -> None:
    users = RedisUsers(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(redis.exceptions.ConnectionError):
        run.run(users.ensure("team-f"))
    assert "team-f" not in users._ensured
