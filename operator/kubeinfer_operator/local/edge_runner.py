"""The runner of one local EdgeFleet: packages, a Redis, the fleet server, kept up until stopped.

``python -m kubeinfer_operator.local.edge_runner --state-dir DIR`` (started by
``kubeinfer up -f fleet.yaml``) does locally what the operator does on a
cluster:

1. makes the fleet's signing key pair and bootstrap token on first start
   (``keys/``, mode 0600; ``KUBEINFER_EDGE_SIGNING_KEY`` /
   ``KUBEINFER_EDGE_BOOTSTRAP_TOKEN`` win when set);
2. builds one signed package per target of the version ``job.json`` names
   (``kubeinfer-runtime edge package``, compiling where the target says so) and
   writes the FleetConfig (``current``, and ``previous`` = the version served
   before: the rollback target);
3. runs a private ``redis-server`` (the fleet's durable state) unless the fleet
   names one, and the fleet server (``serve --role fleet-server``), restarting
   either with a backoff when it dies.

It re-reads ``job.json`` every tick: a new version (``kubeinfer up -f`` of a
changed manifest) is packaged while the current one keeps serving, then the
new FleetConfig starts the rollout. A version whose packaging fails is reported
in ``state.json`` and leaves the fleet on what it ran. SIGTERM/SIGINT stop
every child; the state survives for the next ``up`` (devices, credentials and
rollout live in Redis's append-only file).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from kubeinfer_operator.local.backoff import BackoffPolicy, CrashRecord, on_crash, restart_due
from kubeinfer_operator.local.edge_state import (
    FleetPaths,
    FleetPhase,
    FleetState,
    LocalFleet,
    read_fleet,
    read_fleet_state,
    write_fleet_state,
)
from kubeinfer_operator.local.job_runner import runner_main, setup_logging
from kubeinfer_operator.local.private_redis import PrivateRedis, RedisStartError
from kubeinfer_operator.local.process import (
    free_port,
    signal_exit_name,
    spawn,
    stop_popen,
    tail,
)
from kubeinfer_operator.local.state import process_start_time, take_lock_file, write_atomic
from kubeinfer_runtime.contract.edge import FleetConfig, FleetStatus, FleetVersion, PackageRef
from kubeinfer_runtime.contract.redact import redact_url

log = logging.getLogger("kubeinfer.edge")

EXIT_STOPPED, EXIT_FAILED, EXIT_ALREADY_RUNNING = 0, 1, 3
TICK_S = 0.2
#: Seconds a (re)started fleet server may take to answer /ping.
SERVER_READY_S = 60.0
#: Seconds between two reads of the fleet server's rollout status.
STATUS_INTERVAL_S = 1.0
#: Most events kept in state.json.
MAX_EVENTS = 20


class PackagingFailed(Exception):
    """A target's package could not be built; the message says which and why."""


def _runtime(*args: str) -> list[str]:
    return [sys.executable, "-m", "kubeinfer_runtime", *args]


class FleetRunner:
    def __init__(self, paths: FleetPaths, fleet: LocalFleet) -> None:
        self.paths = paths
        self.fleet = fleet
        self.state = FleetState(name=fleet.name, runner_pid=os.getpid(),
                                runner_start_time=process_start_time(os.getpid()),
                                started_at=time.time())
        earlier = read_fleet_state(paths)
        if earlier is not None:  # the versions outlive a restart of the runner
            self.state.current, self.state.previous = earlier.current, earlier.previous
            self.state.port = earlier.port
        self.stopping = asyncio.Event()
        self.redis: PrivateRedis | None = None
        self.server: subprocess.Popen[bytes] | None = None
        self.server_started = 0.0
        self.server_ready = False
        self.rollout_read = 0.0
        self.crash = CrashRecord()
        self.policy = BackoffPolicy()
        self.token = ""
        self.signing_key = ""

    # -- files -----------------------------------------------------------------------------

    def save(self) -> None:
        self.state.updated_at = time.time()
        write_fleet_state(self.paths, self.state)

    def event(self, message: str, *, level: int = logging.INFO) -> None:
        log.log(level, "EdgeFleet %s: %s", self.fleet.name, message)
        self.state.events = [*self.state.events, message][-MAX_EVENTS:]

    def _ensure_keys(self) -> None:
        self.paths.signing_key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        given_key = os.environ.get("KUBEINFER_EDGE_SIGNING_KEY") or _read(
            self.fleet.signing_key_file)
        if given_key:
            write_atomic(self.paths.signing_key, given_key.strip())
            os.chmod(self.paths.signing_key, 0o600)
            self.paths.public_key.unlink(missing_ok=True)
        if not self.paths.signing_key.exists():
            subprocess.run(_runtime("edge", "keygen", "--out", str(self.paths.signing_key.parent)),
                           check=True, capture_output=True)
            self.event(f"Made the fleet's signing key in {self.paths.signing_key}")
        given_token = os.environ.get("KUBEINFER_EDGE_BOOTSTRAP_TOKEN") or _read(
            self.fleet.bootstrap_token_file)
        if given_token:
            write_atomic(self.paths.token, given_token.strip())
        elif not self.paths.token.exists():
            write_atomic(self.paths.token, secrets.token_urlsafe(32))
        os.chmod(self.paths.token, 0o600)
        self.token = self.paths.token.read_text().strip()
        self.state.token_file = str(self.paths.token)

    # -- packages ------------------------------------------------------------------------

    async def _package(self, fleet: LocalFleet) -> FleetVersion:
        packages: dict[str, PackageRef] = {}
        for target in fleet.targets:
            report = self.paths.report_file(fleet.version, target.name)
            ref = _read_report(report)
            if ref is None:
                argv = _runtime("edge", "package", "--fleet", fleet.name, "--version",
                                fleet.version, "--target", target.name, "--model",
                                fleet.model_uri, "--out", self.paths.packages.as_uri() + "/",
                                "--signing-key-file", str(self.paths.signing_key))
                if target.compile_target:
                    argv += ["--compile-target", target.compile_target]
                report.parent.mkdir(parents=True, exist_ok=True)
                name = f"package-{target.name}"
                # A child of its own (compiling takes minutes): the runner keeps serving.
                child = spawn(argv, env={**os.environ, "KUBEINFER_REPORT_FILE": str(report)},
                              log_path=self.paths.log_file(name))
                while (code := child.poll()) is None:
                    if self.stopping.is_set():
                        stop_popen(child, timeout=10)
                        raise PackagingFailed(f"Stopped while packaging {target.name}")
                    await asyncio.sleep(TICK_S)
                ref = _read_report(report) if code == 0 else None
                if ref is None:
                    report.unlink(missing_ok=True)
                    last = tail(self.paths.log_file(name), lines=4)
                    raise PackagingFailed(
                        f"Packaging version {fleet.version} for target {target.name} failed "
                        f"({signal_exit_name(code)}); see {self.paths.log_file(name)}"
                        + (f": {last}" if last else ""))
            packages[target.name] = ref
        return FleetVersion(version=fleet.version, packages=packages)

    def _write_config(self, fleet: LocalFleet) -> None:
        assert self.state.current is not None
        config = FleetConfig(
            name=fleet.name, current=self.state.current, previous=self.state.previous,
            rollout=fleet.rollout, heartbeatIntervalSeconds=fleet.heartbeat_interval_seconds,
            capture=fleet.capture, publicKey=self._public_key(self.state.current))
        self.state.public_key = config.publicKey
        write_atomic(self.paths.config, config.model_dump_json(indent=2))

    def _public_key(self, version: FleetVersion) -> str:
        """The key the packages were signed with, as their reports name it."""
        for target in version.packages:
            key = _report_field(self.paths.report_file(version.version, target), "publicKey")
            if key:
                return key
        return self.paths.public_key.read_text().strip()

    async def _apply(self, fleet: LocalFleet) -> None:
        """Package ``fleet``'s version when it is new; then the FleetConfig names it."""
        self.fleet = fleet
        current = self.state.current
        if current is not None and current.version == fleet.version:
            self._write_config(fleet)  # rollout, capture or heartbeat settings may differ
            return
        if self.state.failed_version == fleet.version:
            return
        self.state.phase = FleetPhase.PACKAGING if current is None else self.state.phase
        self.event(f"Packaging version {fleet.version} for "
                   f"{', '.join(t.name for t in fleet.targets)}")
        self.save()
        try:
            version = await self._package(fleet)
        except PackagingFailed as exc:
            self.state.failed_version = fleet.version
            self.state.message = str(exc)
            if current is None:
                self.state.phase = FleetPhase.FAILED
            self.event(str(exc), level=logging.ERROR)
            return
        self.state.failed_version = None
        if current is not None and self.server_ready:
            async with httpx.AsyncClient(timeout=2.0) as client:  # fresh, not the last tick's
                self.rollout_read = 0.0
                await self._read_rollout(client)
        if current is not None and not (self.state.rollout_version == current.version
                                        and self.state.rollout_phase == "RolledBack"):
            # The rollback target is what the devices run: after a rolled-back rollout that
            # is still ``previous``, never the version the fleet just refused.
            self.state.previous = current
        self.state.current = version
        self._write_config(fleet)
        self.event(f"Version {version.version} is the fleet's desired version"
                   + (f"; rolling out from {current.version}" if current else ""))

    # -- processes -----------------------------------------------------------------------

    async def _start_redis(self) -> str:
        if self.fleet.redis_url:
            return self.fleet.redis_url
        exe = shutil.which("redis-server")
        if exe is None:
            raise PackagingFailed("The fleet server keeps its state in Redis: install "
                                  "redis-server or set spec redis url (KUBEINFER_REDIS_URL)")
        server = PrivateRedis(exe, self.paths.redis, self.paths.log_file("redis"),
                              free_port(), env=os.environ, policy=self.policy)
        await server.start()
        self.redis = server
        self.event(f"Started a private redis-server on {server.shown_url}; data in {server.data}")
        return server.url

    def _start_server(self, redis_url: str) -> None:
        port = self.fleet.port or self.state.port or free_port()
        self.state.port = port
        env = {**os.environ,
               "KUBEINFER_HOST": self.fleet.host, "KUBEINFER_PORT": str(port),
               "KUBEINFER_FLEET_CONFIG_FILE": str(self.paths.config),
               "KUBEINFER_REDIS_URL": redis_url,
               "KUBEINFER_BOOTSTRAP_TOKEN": self.token,
               "KUBEINFER_CONTROLLER_INTERVAL_SECONDS": str(
                   self.fleet.controller_interval_seconds)}
        for secret in ("KUBEINFER_EDGE_SIGNING_KEY", "KUBEINFER_EDGE_BOOTSTRAP_TOKEN"):
            env.pop(secret, None)  # the server needs neither the private key nor a copy
        self.server = spawn(_runtime("serve", "--role", "fleet-server"), env=env,
                            log_path=self.paths.log_file("fleet-server"))
        self.server_started = time.monotonic()
        self.server_ready = False
        self.state.server_pid = self.server.pid
        host = "127.0.0.1" if self.fleet.host in ("0.0.0.0", "") else self.fleet.host
        self.state.url = f"http://{host}:{port}"

    async def _check_server(self, client: httpx.AsyncClient, redis_url: str) -> None:
        now = time.monotonic()
        if self.server is None:
            if restart_due(self.crash, now):
                self._start_server(redis_url)
            return
        code = self.server.poll()
        if code is not None:
            self.crash = on_crash(self.policy, self.crash, started_at=self.server_started,
                                  now=now)
            self.state.server_restarts += 1
            self.event(f"The fleet server (pid {self.server.pid}) exited "
                       f"({signal_exit_name(code)}); restarting it after a backoff; see "
                       f"{self.paths.log_file('fleet-server')}", level=logging.ERROR)
            self.server, self.state.server_pid = None, None
            self.state.phase = FleetPhase.STARTING
            return
        if not self.server_ready:
            try:
                ok = (await client.get(f"{self.state.url}/ping")).status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                self.server_ready = True
                self.state.phase, self.state.message = FleetPhase.SERVING, ""
                self.event(f"Fleet server listening on {self.state.url}")
            elif now - self.server_started > SERVER_READY_S:
                self.server.kill()

    async def _read_rollout(self, client: httpx.AsyncClient) -> None:
        now = time.monotonic()
        if not self.server_ready or now - self.rollout_read < STATUS_INTERVAL_S:
            return
        self.rollout_read = now
        try:
            answer = await client.get(f"{self.state.url}/v1/fleet",
                                      headers={"Authorization": f"Bearer {self.token}"})
            status = FleetStatus.model_validate_json(answer.content) \
                if answer.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            status = None
        if status is not None:
            self.state.devices = status.devices
            rollout = status.rollout
            self.state.rollout_version = rollout.version if rollout else None
            self.state.rollout_phase = rollout.phase.value if rollout else None

    async def _watch_redis(self) -> None:
        if self.redis is None:
            return
        now = time.monotonic()
        report = self.redis.collect_exit(now)
        if report:
            self.event(report, level=logging.ERROR)
        try:
            restarted = await self.redis.restart_if_due(now)
        except RedisStartError as exc:
            self.event(str(exc), level=logging.ERROR)
            return
        if restarted:
            self.event(restarted)

    # -- lifecycle -----------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        try:
            self._ensure_keys()
            self.save()
            await self._apply(self.fleet)
            self.save()
            if self.state.current is None:
                return EXIT_FAILED
            redis_url = await self._start_redis()
            self.state.redis_url = redact_url(redis_url)
            self._start_server(redis_url)
            async with httpx.AsyncClient(timeout=2.0) as client:
                applying: asyncio.Task[None] | None = None
                while not self.stopping.is_set():
                    fleet = read_fleet(self.paths)
                    # Packaging (compiling, maybe) runs beside the loop: the server and Redis
                    # stay watched meanwhile. A newer manifest waits for the one in hand.
                    if applying is not None and applying.done():
                        applying.result()
                        applying = None
                    if applying is None and fleet is not None and fleet != self.fleet:
                        applying = asyncio.create_task(self._apply(fleet))
                    await self._watch_redis()
                    await self._check_server(client, redis_url)
                    await self._read_rollout(client)
                    self.save()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.stopping.wait(), TICK_S)
            if applying is not None:
                await applying  # it sees ``stopping`` and stops its packaging child
            return EXIT_STOPPED
        except (PackagingFailed, RedisStartError, subprocess.CalledProcessError) as exc:
            self.state.phase, self.state.message = FleetPhase.FAILED, str(exc)
            self.event(str(exc), level=logging.ERROR)
            return EXIT_FAILED
        finally:
            if self.server is not None:
                stop_popen(self.server, timeout=10)
            if self.redis is not None:
                await self.redis.stop()
            if self.state.phase is not FleetPhase.FAILED:
                self.state.phase = FleetPhase.STOPPED
            self.state.server_pid = None
            self.save()


def _read(path: str | None) -> str:
    if path is None:
        return ""
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def _report_field(path: Path, field: str) -> str:
    try:
        return str(json.loads(path.read_text()).get(field) or "")
    except (OSError, ValueError, AttributeError):
        return ""


def _read_report(path: Path) -> PackageRef | None:
    try:
        data = json.loads(path.read_text())
        return PackageRef(uri=data["uri"], sha256=data["sha256"], size=data["size"],
                          signature=data["signature"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run_runner(state_dir: Path) -> int:
    setup_logging()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per health check otherwise
    paths = FleetPaths(state_dir)
    fleet = read_fleet(paths)
    if fleet is None:
        log.error("No readable fleet at %s; start EdgeFleets with kubeinfer up -f", paths.job)
        return 2
    paths.logs.mkdir(parents=True, exist_ok=True)
    lock = take_lock_file(paths.lock)
    if lock is None:
        log.error("EdgeFleet %s already has a running runner", fleet.name)
        return EXIT_ALREADY_RUNNING
    return asyncio.run(FleetRunner(paths, fleet).run())


def main(argv: list[str] | None = None) -> int:
    return runner_main(argv, "kubeinfer-edge-runner", run_runner)


if __name__ == "__main__":
    sys.exit(main())
