"""The device agent (``kubeinfer-runtime edge agent``): register, heartbeat, install, serve.

One asyncio process per device. It registers once with the bootstrap token
(keeping the per-device credential and the fleet's public key in the state
dir, 0600), then heartbeats every ``heartbeatIntervalSeconds`` (jittered, with
exponential backoff while the server is unreachable: the device keeps serving
offline). When ``DesiredState`` names a version it does not serve, it installs
it (``agent_install``: download bounded by the announced size, sha256 and
signature checked with the pinned key before extracting, inactive slot, child
model server, warm-up, atomic switch) and reports the outcome in the next
heartbeat. The local front (``agent_proxy``) serves the current version and
samples captures, which are uploaded when the server answers and removed from
the buffer only after a 2xx.

Key pinning: the first public key seen (``--public-key`` or the server's at
registration) is pinned; a server that later registers the device with another
key is refused, unless ``--public-key`` is given, which always wins. The fleet's
name is pinned the same way (signatures cover it, so a server that moved the
device to another fleet could replay that fleet's packages); only removing
``credential.json`` moves a device. Registering again sends the credential the
device holds (``DEVICE_CREDENTIAL_HEADER``): the server lets only its holder, or a
device whose id has been silent a while, take over a registered id.

The fleet server is not trusted with the agent's memory either: every request asks
for ``Accept-Encoding: identity`` and replies are read undecoded (a Content-Encoding
is refused), JSON replies within ``MAX_REPLY_BYTES`` and packages within their
announced size.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import shutil
import signal
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from pydantic import ValidationError

from kubeinfer_runtime.contract.edge import (
    DEVICE_CREDENTIAL_HEADER,
    MAX_CAPTURE_UPLOAD_BYTES,
    DeploymentOutcome,
    DeploymentResult,
    DesiredState,
    EdgeCapture,
    Heartbeat,
    HeartbeatResponse,
    RegisterRequest,
    RegisterResponse,
    valid_name,
)
from kubeinfer_runtime.edge import agent_install as inst
from kubeinfer_runtime.edge import package as pkg
from kubeinfer_runtime.edge import signing
from kubeinfer_runtime.edge.agent_proxy import Proxy
from kubeinfer_runtime.edge.capture_buffer import CaptureBuffer
from kubeinfer_runtime.edge.errors import EdgeError
from kubeinfer_runtime.wire import GRACEFUL_SHUTDOWN_S

log = logging.getLogger("kubeinfer.edge.agent")

AGENT_VERSION = "1"
CREDENTIAL_FILE = "credential.json"
MAX_BACKOFF_S = 60.0
REQUEST_TIMEOUT_S = 30.0
#: Idle connections to the fleet server (and to the model server child) are dropped
#: after this, seconds: inside the runtime's keep-alive timeout (5 s), which httpx's own
#: 5 s matched, so with heartbeats about 5 s apart one could go out on a connection the
#: server was closing (a failed heartbeat, retried after a backoff).
FLEET_KEEPALIVE_S = 2.0
#: The largest package the agent downloads, whatever the fleet announces.
MAX_PACKAGE_BYTES = 8 << 30
#: The largest JSON reply the agent reads from the fleet (registration, heartbeat).
MAX_REPLY_BYTES = 1 << 20


@dataclass(frozen=True)
class AgentConfig:
    server: str
    device_id: str
    target: str
    state_dir: Path
    bootstrap_token: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    listen_host: str = "127.0.0.1"
    listen_port: int = 8080
    #: base64 ed25519 key given on the command line: always wins over the server's.
    public_key: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> AgentConfig:
        for what, value in (("--device-id", args.device_id), ("--target", args.target)):
            if not valid_name(value):
                raise EdgeError(f"{what} {value[:70]!r} must be a DNS-label-like name "
                                "(lower case letters, digits, '-', '.', '_')")
        labels: dict[str, str] = {}
        for item in filter(None, (args.labels or "").split(",")):
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise EdgeError(f"--labels item {item[:70]!r} is not k=v")
            labels[key.strip()] = value.strip()
        host, sep, port = args.listen.rpartition(":")
        if not sep or not port.isdigit():
            raise EdgeError(f"--listen {args.listen[:70]!r} is not HOST:PORT")
        public_key = None
        if args.public_key:
            text = args.public_key
            if text.startswith("@"):
                try:
                    text = Path(text[1:]).read_text()
                except OSError as e:
                    raise EdgeError(f"--public-key file {text[1:]} cannot be read "
                                    f"({e.strerror})") from None
            signing.public_key(text)  # refuse a malformed key now
            public_key = text.strip()
        return cls(server=args.server.rstrip("/"), device_id=args.device_id,
                   target=args.target, state_dir=args.state_dir,
                   bootstrap_token=args.bootstrap_token, labels=labels,
                   listen_host=host or "127.0.0.1", listen_port=int(port),
                   public_key=public_key)


#: The fleet's last capture settings (``EdgeCapture``), kept across restarts.
CAPTURE_FILE = "capture.json"


class Unauthorized(EdgeError):
    """The server refused the device's credential: register again."""


async def read_reply(r: httpx.Response, what: str) -> bytes:
    """The body of a streamed reply, undecoded (``inst.check_identity``) and within
    ``MAX_REPLY_BYTES``: EdgeError beyond, checked as bytes arrive."""
    inst.check_identity(r, what)
    too_large = EdgeError(f"{what} is over {MAX_REPLY_BYTES} bytes: refused")
    declared = r.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_REPLY_BYTES:
        raise too_large
    parts: list[bytes] = []
    size = 0
    async for chunk in inst.raw_chunks(r):
        size += len(chunk)
        if size > MAX_REPLY_BYTES:
            raise too_large
        parts.append(chunk)
    return b"".join(parts)


async def _refusal(r: httpx.Response) -> str:
    """The message of a refusal from the fleet server, on one line and bounded ("" when the
    reply has none)."""
    try:
        body = json.loads(await read_reply(r, "Refusal"))
    except (EdgeError, httpx.HTTPError, ValueError):
        return ""
    message = body.get("message") if isinstance(body, dict) else None
    return " ".join(str(message).split())[:400] if message else ""


@dataclass(frozen=True)
class _Retry:
    """A version whose tries so far all failed transiently, and when to try it again."""

    key: tuple[str, str]  # (version, sha256)
    attempts: int
    at: float  # time.monotonic()


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.dir = config.state_dir
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.state = inst.recover(self.dir)
        # The fleet's last capture settings survive a restart: a device rebooted while
        # offline samples and bounds its buffer as the fleet said, not by defaults.
        capture = self._load_capture()
        self.buffer = CaptureBuffer(self.dir / "captures", capture.bufferBytes)
        self.buffer.configure(capture.bufferBytes, capture.onFull)
        self.proxy = Proxy(config.device_id, self.buffer)
        self.proxy.sampling_percentage = capture.samplingPercentage
        # Identity by default too (each request to the fleet also says so): the model
        # server child's replies, read with this client, need no decoding either.
        # The fleet server may be reached through the device's proxy (HTTP(S)_PROXY), the
        # model server child on 127.0.0.1 never: a more specific mount wins over the env's.
        self.client = httpx.AsyncClient(
            timeout=REQUEST_TIMEOUT_S, headers=inst.IDENTITY,
            limits=httpx.Limits(keepalive_expiry=FLEET_KEEPALIVE_S),
            mounts={"all://127.0.0.1": httpx.AsyncHTTPTransport(
                limits=httpx.Limits(keepalive_expiry=FLEET_KEEPALIVE_S))})
        self.child: inst.ModelChild | None = None
        self.credential: dict[str, object] | None = self._load_credential()
        #: The credential the server last refused: still sent when registering again, so
        #: a refusal that was not the server's (a route answering 404) does not lock the
        #: device out of its own id.
        self.old_credential: str | None = None
        self.interval = 30.0
        self.started = time.monotonic()
        self.stopping = asyncio.Event()
        self.wake = asyncio.Event()
        self.install_task: asyncio.Task[None] | None = None
        self.updating_to = ""
        self.retry: _Retry | None = None

    # -- credential and key pinning ---------------------------------------------------------

    def _load_credential(self) -> dict[str, object] | None:
        try:
            data = json.loads((self.dir / CREDENTIAL_FILE).read_text())
        except FileNotFoundError:
            return None
        except ValueError:
            log.error("%s is unreadable: registering again", CREDENTIAL_FILE)
            return None
        return data if isinstance(data, dict) else None

    @property
    def public_key(self) -> str:
        if self.config.public_key:
            return self.config.public_key
        key = (self.credential or {}).get("publicKey")
        if not isinstance(key, str):
            raise EdgeError("No public key pinned: register first or pass --public-key")
        return key

    def _auth(self) -> dict[str, str]:
        return {"authorization": f"Bearer {(self.credential or {}).get('credential', '')}",
                **inst.IDENTITY}

    async def register(self) -> None:
        if not self.config.bootstrap_token:
            raise EdgeError("The device is not registered and has no --bootstrap-token: pass "
                            "one (or KUBEINFER_EDGE_BOOTSTRAP_TOKEN)")
        body = RegisterRequest(deviceId=self.config.device_id, target=self.config.target,
                               labels=self.config.labels, agentVersion=AGENT_VERSION)
        headers = {"authorization": f"Bearer {self.config.bootstrap_token}",
                   "content-type": "application/json", **inst.IDENTITY}
        # The proof that this device holds the id: the server refuses (409) to register an
        # id whose device is active to anyone else.
        proof = (self.credential or {}).get("credential") or self.old_credential
        if isinstance(proof, str) and proof:
            headers[DEVICE_CREDENTIAL_HEADER] = proof
        async with self.client.stream("POST", self.config.server + "/v1/register",
                                      content=body.model_dump_json(), headers=headers) as r:
            if r.status_code == 401:
                raise EdgeError("Registration refused (HTTP 401): check --bootstrap-token")
            if r.status_code in (403, 409):
                raise EdgeError(f"Registration refused (HTTP {r.status_code}): "
                                f"{await _refusal(r) or 'the fleet server gave no reason'}")
            r.raise_for_status()
            content = await read_reply(r, "Registration reply")
        reply = RegisterResponse.model_validate_json(content)
        signing.public_key(reply.publicKey)  # a malformed key is refused before pinning
        pinned = (self.credential or {}).get("publicKey")
        if not self.config.public_key and isinstance(pinned, str) and pinned != reply.publicKey:
            raise EdgeError("The fleet server registered the device with a public key other "
                            "than the pinned one: refused (pass --public-key to trust a new "
                            "key, or remove credential.json from the state dir)")
        # Signatures cover the fleet's name: a device moved to another fleet would accept
        # that fleet's packages. Pinned like the key.
        pinned_fleet = (self.credential or {}).get("fleet")
        if isinstance(pinned_fleet, str) and pinned_fleet and pinned_fleet != reply.fleet:
            raise EdgeError(f"The fleet server registered the device in fleet "
                            f"{reply.fleet[:253]!r}, but it belongs to fleet {pinned_fleet!r}: "
                            "refused (remove credential.json from the state dir to move the "
                            "device to another fleet)")
        self.credential = {"deviceId": reply.deviceId, "credential": reply.credential,
                           "fleet": reply.fleet,
                           "publicKey": pinned if isinstance(pinned, str) else reply.publicKey,
                           "registeredAt": time.time()}
        inst.write_private(self.dir / CREDENTIAL_FILE, json.dumps(self.credential).encode())
        self.old_credential = None
        self.interval = float(reply.heartbeatIntervalSeconds)
        log.info("Registered %s with fleet %s", reply.deviceId, reply.fleet)

    # -- heartbeat ----------------------------------------------------------------------------

    def heartbeat_body(self) -> Heartbeat:
        current = self.state.current
        return Heartbeat(
            version=current.version if current else "",
            updating=bool(self.updating_to), updatingTo=self.updating_to,
            lastDeployment=self.state.lastDeployment,
            lastInferenceAt=self.proxy.stats.last_inference_at,
            requests=self.proxy.stats.requests, errors=self.proxy.stats.errors,
            latencyP99Ms=self.proxy.stats.p99_ms(), capturesDropped=self.buffer.dropped,
            capturesBuffered=self.buffer.buffered,
            uptimeSeconds=time.monotonic() - self.started)

    async def heartbeat(self) -> HeartbeatResponse:
        async with self.client.stream(
                "POST", f"{self.config.server}/v1/devices/{self.config.device_id}/heartbeat",
                content=self.heartbeat_body().model_dump_json(),
                headers={**self._auth(), "content-type": "application/json"}) as r:
            if r.status_code in (401, 403, 404):
                raise Unauthorized(f"Heartbeat refused (HTTP {r.status_code})")
            r.raise_for_status()
            content = await read_reply(r, "Heartbeat reply")
        return HeartbeatResponse.model_validate_json(content)

    async def upload_captures(self) -> None:
        """Upload buffered records batch by batch; each is removed only after a 2xx.

        A batch refused as too large (413: a proxy in front of the fleet with a lower
        limit) is sent again in halves; a single record refused so is dropped (counted as
        dropped), since it would be refused for ever and hold back every record after it."""
        limit = MAX_CAPTURE_UPLOAD_BYTES
        while (batch := self.buffer.take_batch(limit)) is not None:
            # The reply's body is not needed (a 2xx is the acknowledgement): never read.
            async with self.client.stream(
                    "POST", f"{self.config.server}/v1/devices/{self.config.device_id}/captures",
                    content=batch.jsonl(),
                    headers={**self._auth(), "content-type": "application/jsonl"}) as r:
                status = r.status_code
            if status == 413 and len(batch.records) > 1:
                limit = max(1, batch.size // 2)
                continue
            if status == 413:
                # Its size only: the record holds a caller's request and response.
                log.warning("Capture upload of one record of %d bytes answered HTTP 413: the "
                            "record is dropped", batch.size)
                self.buffer.discard(batch)
                continue
            if not 200 <= status < 300:
                log.warning("Capture upload answered HTTP %d: kept for a retry", status)
                return
            self.buffer.ack(batch)

    async def loop(self) -> None:
        backoff = 1.0
        while not self.stopping.is_set():
            try:
                if not (self.credential or {}).get("credential"):
                    await self.register()
                reply = await self.heartbeat()
                started = self.apply(reply)
                await self.upload_captures()
                backoff = 1.0
                # After the reply: it may have changed the interval. An install that just
                # started is reported at once (Updating, to what), so the fleet sees the
                # device took its desired state within the interval it was given, not the
                # next one.
                delay = 0.0 if started else self.interval * random.uniform(0.8, 1.2)
            except Unauthorized as e:
                # The pinned key and fleet stay: only the credential is replaced.
                log.warning("%s: registering again", e.message)
                if self.credential is not None:
                    old = self.credential.pop("credential", None)
                    if isinstance(old, str) and old:
                        self.old_credential = old
                delay = min(backoff, self.interval)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
            except (httpx.HTTPError, ValidationError, EdgeError, OSError) as e:
                message = e.message if isinstance(e, EdgeError) else type(e).__name__
                if isinstance(e, ValidationError):  # our own models: say which field
                    message += f": {e.errors()[0].get('loc')} {e.errors()[0].get('msg')}"
                log.warning("Fleet server unreachable or refused (%s): retrying in %.0f s",
                            message, backoff)
                delay = backoff * random.uniform(0.8, 1.2)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wait_any()

    async def _wait_any(self) -> None:
        stop = asyncio.ensure_future(self.stopping.wait())
        wake = asyncio.ensure_future(self.wake.wait())
        try:
            await asyncio.wait([stop, wake], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            wake.cancel()

    def _load_capture(self) -> EdgeCapture:
        try:
            return EdgeCapture.model_validate_json((self.dir / CAPTURE_FILE).read_bytes())
        except (OSError, ValueError):
            return EdgeCapture()

    def apply(self, reply: HeartbeatResponse) -> bool:
        """Take the fleet's answer; True when it started an install."""
        self.interval = float(reply.heartbeatIntervalSeconds)
        if reply.capture != self._load_capture():
            inst.write_private(self.dir / CAPTURE_FILE, reply.capture.model_dump_json().encode())
        self.buffer.configure(reply.capture.bufferBytes, reply.capture.onFull)
        self.proxy.sampling_percentage = reply.capture.samplingPercentage
        desired = reply.desired
        if desired is None or self.install_task is not None:
            return False
        current = self.state.current
        if current is not None and current.version == desired.version \
                and current.sha256 in ("", desired.sha256):
            return False
        if (self.state.failedVersion, self.state.failedSha256) == (desired.version,
                                                                  desired.sha256):
            return False  # failed before: wait for the fleet to name another package
        if self.retry is not None and self.retry.key == (desired.version, desired.sha256) \
                and time.monotonic() < self.retry.at:
            return False  # failed transiently: try again once its delay has passed
        # Set before the task runs: the heartbeat that follows at once reports it.
        self.updating_to = desired.version
        self.install_task = asyncio.create_task(self._install(desired))
        return True

    # -- install ------------------------------------------------------------------------------

    async def _install(self, desired: DesiredState) -> None:
        # ``updating_to`` was set by ``apply``, the one place an install starts.
        try:
            await self.install(desired)
        except asyncio.CancelledError:
            raise
        except inst.TransientInstallError as e:
            key = (desired.version, desired.sha256)
            attempts = (self.retry.attempts if self.retry and self.retry.key == key else 0) + 1
            delay = inst.retry_delay(attempts)
            if delay is not None:
                log.warning("Install of %s failed (%s), try %d of %d: trying again in %.0f s",
                            desired.version, e.message, attempts, inst.INSTALL_ATTEMPTS, delay)
                self.retry = _Retry(key, attempts, time.monotonic() + delay)
                self.state.pending = None
                inst.save_state(self.dir, self.state)
            else:
                self._failed(desired, f"{e.message} ({attempts} tries)")
        except (EdgeError, OSError) as e:
            message = e.message if isinstance(e, EdgeError) else f"{e.strerror} ({e.filename})"
            self._failed(desired, message)
        except Exception as e:
            # Anything else (a MemoryError, a bug): the version still fails for good,
            # reported and not retried at every heartbeat, and the journal is cleared. The
            # type and where it was raised only: an exception's text may quote payload.
            where = traceback.extract_tb(e.__traceback__)[-1:] if e.__traceback__ else []
            at = f" at {Path(where[0].filename).name}:{where[0].lineno}" if where else ""
            self._failed(desired, f"Install failed unexpectedly ({type(e).__name__}{at})")
        else:
            self.retry = None
        finally:
            self.updating_to = ""
            self.install_task = None
            self.wake.set()  # report the outcome now, not one interval later

    def _failed(self, desired: DesiredState, message: str) -> None:
        """``desired`` failed for good: reported, and not tried again until the fleet names
        another package."""
        log.error("Install of %s failed: %s", desired.version, message)
        self.state.lastDeployment = DeploymentResult(
            version=desired.version, outcome=DeploymentOutcome.FAILED,
            message=message[:1024], at=time.time())
        self.state.failedVersion, self.state.failedSha256 = desired.version, desired.sha256
        self.retry = None
        self.state.pending = None
        inst.save_state(self.dir, self.state)

    async def install(self, desired: DesiredState) -> None:
        slot = self.state.inactive_slot()
        root = inst.slot_dir(self.dir, slot)
        self.state.pending = inst.Pending(slot=slot, version=desired.version,
                                          sha256=desired.sha256, startedAt=time.time())
        inst.save_state(self.dir, self.state)
        new: inst.ModelChild | None = None
        try:
            if desired.target != self.config.target:
                raise inst.InstallError(f"The fleet sent a package for target "
                                        f"{desired.target!r}, the device is "
                                        f"{self.config.target!r}")
            if not 0 < desired.size <= MAX_PACKAGE_BYTES:
                raise inst.InstallError(f"Package size {desired.size} is outside (0, "
                                        f"{MAX_PACKAGE_BYTES}]")
            part = self.dir / "downloads" / "package.tar.gz"
            url, ours = inst.package_url(self.config.server, desired.packageUrl)
            await inst.download(self.client, url, part, desired.size,
                                self._auth() if ours else dict(inst.IDENTITY))
            fleet = str((self.credential or {}).get("fleet", ""))
            # Checked before a single byte is extracted: size, sha256, then the signature.
            await asyncio.to_thread(
                pkg.verify_download, part, sha256=desired.sha256, size=desired.size,
                signature=desired.signature, public_key=self.public_key, fleet=fleet,
                version=desired.version, target=desired.target)
            manifest = await asyncio.to_thread(pkg.extract, part, root)
            part.unlink(missing_ok=True)
            if (manifest.fleet, manifest.version, manifest.target) != \
                    (fleet, desired.version, desired.target):
                raise inst.InstallError("The package's manifest names another fleet, version "
                                        "or target than the signed announcement")
            installed = inst.Installed(slot=slot, version=desired.version,
                                       sha256=desired.sha256, format=manifest.format,
                                       model=manifest.model)
            new = inst.ModelChild.start(self.dir, slot, installed)
            await new.wait_ready(self.client, inst.READY_TIMEOUT_S)
            await new.warm_up(self.client)
        except BaseException:
            if new is not None:
                await new.stop()
            shutil.rmtree(root, ignore_errors=True)
            raise
        # The switch: the proxy first (callers see the new version at once), then the
        # journal, then the old child stops (its in-flight requests finish first).
        old = self.child
        self.child = new
        self.proxy.upstream, self.proxy.version = new.url, desired.version
        self.state.current = installed
        self.state.pending = None
        self.state.lastDeployment = DeploymentResult(
            version=desired.version, outcome=DeploymentOutcome.SUCCEEDED, at=time.time())
        self.state.failedVersion = self.state.failedSha256 = ""
        inst.save_state(self.dir, self.state)
        log.info("Now serving %s from slot %s", desired.version, slot)
        if old is not None:
            await old.stop()
            shutil.rmtree(inst.slot_dir(self.dir, old.slot), ignore_errors=True)

    async def start_current(self) -> None:
        """Serve what state.json says is current (after a restart)."""
        current = self.state.current
        if current is None:
            return
        child = inst.ModelChild.start(self.dir, current.slot, current)
        try:
            await child.wait_ready(self.client, inst.READY_TIMEOUT_S)
        except inst.InstallError as e:
            log.error("Installed version %s does not start: %s", current.version, e.message)
            await child.stop()
            return
        self.child = child
        self.proxy.upstream, self.proxy.version = child.url, current.version

    async def stop_install(self) -> None:
        """Cancel the install in progress, if any (the current version keeps serving)."""
        if self.install_task is not None:
            self.install_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.install_task

    async def close(self) -> None:
        await self.stop_install()
        if self.child is not None:
            await self.child.stop()
        await self.client.aclose()
        await self.proxy.aclose()


# -- process ------------------------------------------------------------------------------------


async def _main(config: AgentConfig) -> int:
    import uvicorn

    from kubeinfer_runtime.http_limits import LimitedHttpProtocol

    class _Server(uvicorn.Server):
        # The agent owns SIGTERM/SIGINT (to stop its children too); uvicorn's own capture
        # would re-raise the signal after its shutdown.
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    agent = Agent(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.stopping.set)
    # The device's listener takes the runtime's connection bounds (``http_limits``:
    # header and body timeouts, the body's minimum rate, a connection cap), as every
    # runtime role's does: callers on the device's network are no more trusted.
    server = _Server(uvicorn.Config(agent.proxy, host=config.listen_host,
                                    port=config.listen_port, lifespan="on", access_log=False,
                                    log_level="warning", ws="none", http=LimitedHttpProtocol,
                                    # Bounds the drain of taken requests on SIGTERM, which
                                    # the model server outlives (``finally`` below).
                                    timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S))
    serving = asyncio.create_task(server.serve())
    heartbeats: asyncio.Task[None] | None = None
    code = 0
    try:
        # Before the first heartbeat: an install must not race the restart of the current
        # version for the proxy.
        await agent.start_current()
        heartbeats = asyncio.create_task(agent.loop())
        stopping = asyncio.create_task(agent.stopping.wait())
        await asyncio.wait({heartbeats, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if heartbeats.done() and not agent.stopping.is_set():
            # The loop outlasts every error it expects; anything else ended it. Serving on
            # without heartbeats would leave the device invisible to its fleet and deaf to
            # new versions: exit non-zero so the service manager starts a fresh agent.
            error = None if heartbeats.cancelled() else heartbeats.exception()
            log.error("The heartbeat loop stopped (%s): exiting so the agent is restarted",
                      f"{type(error).__name__}: {error}" if error else "it returned")
            code = 1
    finally:
        log.info("Stopping: the listener, the install in progress, the model server")
        server.should_exit = True
        if heartbeats is not None and not heartbeats.done():  # a finished one was logged
            heartbeats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeats
        await agent.stop_install()
        # The listener drains first (no new requests; the ones taken are answered), then
        # the model server stops: stopped first, it would leave those requests a 503.
        try:
            await serving
        finally:
            await agent.close()
    return code


def run_agent(config: AgentConfig) -> int:
    try:
        return asyncio.run(_main(config))
    except EdgeError as e:
        log.error("%s", e.message)
        return 2
