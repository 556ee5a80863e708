"""The private redis-server of a local async endpoint, supervised like any child.

Local mode starts one when ``KUBEINFER_REDIS_URL`` is not set (see
``async_local``). It is the endpoint's queue, so it is kept up as a model
server is: when it dies (a crash, the OOM killer, a SIGKILL) the supervisor
restarts it on the **same port** (gateways and workers keep their URL and
reconnect by themselves) with the **same data directory**, after the crash
backoff of ``backoff`` (0.5 s, doubling while it keeps dying, at most 10 s),
and reports the crash and the restart as events. ``kubeinfer status`` shows it
as the process ``redis``; while it is down the endpoint is not Ready.

Durability: the queue is an append-only file fsynced on every write
(``appendfsync always``). The gateway answers 202 only after its XADD, so an
accepted request must survive a crash. With ``everysec`` a SIGKILL of
redis-server alone usually loses nothing (Redis writes the AOF before it
replies; the kernel keeps what was written), but a power loss or kernel crash
loses up to a second of accepted requests, and so does a SIGKILL while a slow
background fsync makes Redis postpone its AOF writes. ``always`` closes both;
measured here it cost nothing visible on 100 submits through the gateway
(100-137 ms either way; fsync adds about 0.07 ms per Redis write on this disk).

Access: it listens on 127.0.0.1, which every user of the machine can reach, so it
asks for a password (``requirepass``): without one, another user could read the
queued requests, or delete them (accepted work lost) or queue their own. The
password is made once per data directory and kept there (``password``, 0600, in
the user's private ``$KUBEINFER_HOME``), so a restarted server, and the gateways
and workers already holding the URL, keep using it. It reaches redis-server in a
config file beside it, never in its argv (``/proc/<pid>/cmdline`` is world
readable), and the gateway and workers in their environment (``KUBEINFER_REDIS_URL``;
``/proc/<pid>/environ`` is the user's alone). ``url`` carries it; what is shown
(events, ``kubeinfer status``) is ``shown_url``, without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

from kubeinfer_operator.local.backoff import BackoffPolicy, CrashRecord, on_crash, restart_due
from kubeinfer_operator.local.process import signal_exit_name, spawn, tail
from kubeinfer_operator.local.state import (
    ProcessState,
    ProcState,
    process_start_time,
    write_atomic,
)

#: Seconds a (re)started redis-server may take to answer PING (it loads its AOF first).
READY_TIMEOUT_S = 30.0
NAME = "redis"
#: Files in the data directory: the password, and the config file that hands it over.
PASSWORD_FILE = "password"
CONFIG_FILE = "redis.conf"


def data_password(data: Path) -> str:
    """The private Redis's password for ``data``: the one kept there, else a new one.

    Hex, so it needs no escaping in a URL or a config file. A kept one that is not
    64 hex digits (truncated, edited) is replaced: the server is restarted with the
    new one before any client is given its URL.
    """
    data.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(OSError):
        data.chmod(0o700)  # an older version made it with the umask's 0755
    path = data / PASSWORD_FILE
    try:
        kept = path.read_text().strip()
    except OSError:
        kept = ""
    if len(kept) == 64 and all(c in "0123456789abcdef" for c in kept):
        return kept
    password = secrets.token_hex(32)
    write_atomic(path, password + "\n")  # mkstemp's 0600, from the first byte
    return password


class RedisStartError(Exception):
    """The private redis-server did not come up; the message says where to look."""


class PrivateRedis:
    """One redis-server process on a fixed port, restarted with backoff when it dies."""

    def __init__(self, exe: str, data: Path, log_path: Path, port: int, *,
                 env: Mapping[str, str], policy: BackoffPolicy | None = None) -> None:
        self.exe = exe
        self.data = data
        self.log_path = log_path
        self.port = port
        self.env = dict(env)
        self.policy = policy or BackoffPolicy()
        self.password = data_password(data)
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.start_time: int | None = None
        self.crash = CrashRecord()
        self.restarts = 0
        self.state = ProcState.STARTING
        self.reason = "starting"
        self.last_exit: int | None = None

    @property
    def url(self) -> str:
        """What clients connect with (its password in it)."""
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    @property
    def shown_url(self) -> str:
        """What events and ``kubeinfer status`` show."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def argv(self) -> list[str]:
        """The command line: the config file (the password) first, as redis-server wants."""
        return [self.exe, str(self.data / CONFIG_FILE), "--bind", "127.0.0.1",
                "--port", str(self.port), "--dir", str(self.data), "--appendonly", "yes",
                "--appendfsync", "always", "--save", ""]

    async def start(self) -> None:
        """Spawn it and wait until it answers PING (its AOF loaded); RedisStartError if not."""
        self.data.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Written at every start: the data directory may have been emptied meanwhile.
        write_atomic(self.data / CONFIG_FILE, f"requirepass {self.password}\n")  # 0600
        self.proc = spawn(self.argv(), env=self.env, log_path=self.log_path)
        self.started_at = time.monotonic()
        self.start_time = process_start_time(self.proc.pid)
        self.state, self.reason = ProcState.STARTING, "loading its append-only file"
        import redis.asyncio

        client = redis.asyncio.from_url(self.url)
        try:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while True:
                try:
                    await client.ping()
                    break
                except Exception:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        last = tail(self.log_path, lines=4)
                        raise RedisStartError(
                            f"Private redis-server on port {self.port} did not start; see "
                            f"{self.log_path}" + (f"; last lines:\n{last}" if last else "")
                        ) from None
                    await asyncio.sleep(0.02)
        finally:
            await client.aclose()
        self.state, self.reason = ProcState.READY, ""

    def collect_exit(self, now: float) -> str | None:
        """When it died on its own: schedule the restart; the event's message."""
        if self.proc is None or self.state is ProcState.BACKOFF:
            return None
        code = self.proc.poll()
        if code is None:
            return None
        self.last_exit = code
        self.crash = on_crash(self.policy, self.crash, started_at=self.started_at, now=now)
        delay = (self.crash.restart_at or now) - now
        how = signal_exit_name(code)
        self.state = ProcState.BACKOFF
        self.reason = f"exited ({how}), restarting in {delay:.1f}s"
        return (f"Private redis-server (pid {self.proc.pid}) exited ({how}): async requests "
                f"cannot be queued or processed until it is back; restarting it in "
                f"{delay:.1f}s on port {self.port} from its append-only file in {self.data}")

    async def restart_if_due(self, now: float, *, force: bool = False) -> str | None:
        """Restart after its backoff (at once with ``force``); the event's message.

        Raises RedisStartError (the next crash backoff is scheduled) when it does not
        come up, e.g. because another process took its port meanwhile.
        """
        if self.state is not ProcState.BACKOFF or not (force or restart_due(self.crash, now)):
            return None
        self.restarts += 1
        try:
            await self.start()
        except RedisStartError:
            self.state = ProcState.STARTING  # collect_exit sees the failed start next
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            raise
        return (f"Restarted the private redis-server (restart {self.restarts}) as pid "
                f"{self.pid} on port {self.port}; queued requests were reloaded from its "
                "append-only file")

    async def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            for _ in range(250):
                if proc.poll() is not None:
                    break
                await asyncio.sleep(0.02)
            else:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        self.state, self.reason = ProcState.STOPPED, ""

    def snapshot(self) -> ProcessState:
        pid = self.pid if self.running else None
        return ProcessState(
            name=NAME, role="redis", pid=pid, start_time=self.start_time if pid else None,
            port=self.port, url=self.shown_url, state=self.state, reason=self.reason,
            routed=False, restarts=self.restarts, last_exit=self.last_exit,
            log=str(self.log_path))
