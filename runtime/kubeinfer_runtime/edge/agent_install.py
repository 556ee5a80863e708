"""The agent's A/B install: state.json, the two slots, the model-server child and its warm-up.

A device must never serve half a version, whatever kills it and when. Two
slots (``slots/a``, ``slots/b``) hold packages; a new version is only ever
written into the slot not being served. ``state.json`` (written atomically:
temp file, fsync, rename) names the current slot and version and, while an
install runs, a ``pending`` journal. The switch is: new child ready and warm →
the proxy points at it → ``state.json`` says current = new slot → the old
child stops. So a restart sees either the old current (and a pending entry it
discards, deleting that slot) or the new one, and re-checks the current slot's
files against their manifest before serving it.

The model server child is ``python -m kubeinfer_runtime serve --role
model-server`` on 127.0.0.1 and a free port, configured by the
``ModelServerSettings`` env vars; the kernel stops it if the agent dies
(``PR_SET_PDEATHSIG``), so a SIGKILLed agent leaves no server behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, ConfigDict

from kubeinfer_runtime.contract.edge import DeploymentResult
from kubeinfer_runtime.edge import package as pkg
from kubeinfer_runtime.edge.errors import EdgeError

log = logging.getLogger("kubeinfer.edge.agent")

SLOTS = ("a", "b")
STATE_FILE = "state.json"
#: How long a new child has to answer /ping, and the warm-up inference to answer.
READY_TIMEOUT_S = 120.0
WARMUP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
#: What the model server's not-ready reason says once loading failed for good (its own
#: load-time warm-up included); equal to ``server.state.LOAD_FAILED_MARKER``, not imported
#: so the agent does not load the model server's modules.
LOAD_FAILED_MARKER = "failed to load"
_PR_SET_PDEATHSIG = 1


class InstallError(EdgeError):
    """A version could not be installed; the current one keeps serving."""


class TransientInstallError(InstallError):
    """An install failed on something that may pass by itself (the network, the fleet
    server busy or restarting): tried again later (``retry_delay``), not held against the
    version at once."""


#: Answers of a package download that say "later", not "never".
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
#: Tries of one version whose failures are all transient before it is failed for good.
INSTALL_ATTEMPTS = 5


def retry_delay(attempts: int) -> float | None:
    """PURE: seconds before trying again a version whose ``attempts`` tries all failed
    transiently; None once ``INSTALL_ATTEMPTS`` were made (then it fails for good, and the
    fleet sees it: a wave must not wait forever on a device that cannot download)."""
    if attempts >= INSTALL_ATTEMPTS:
        return None
    return min(2.0 ** (attempts - 1), 60.0)


class Installed(BaseModel):
    model_config = ConfigDict(extra="ignore")

    slot: str
    version: str
    sha256: str = ""
    format: str = "onnx"
    model: str = ""


class Pending(BaseModel):
    model_config = ConfigDict(extra="ignore")

    slot: str
    version: str
    sha256: str
    startedAt: float


class AgentState(BaseModel):
    """``state.json``: what the device serves, what it is installing, what happened last."""

    model_config = ConfigDict(extra="ignore")

    current: Installed | None = None
    pending: Pending | None = None
    lastDeployment: DeploymentResult | None = None
    #: (version, sha256) of the last failed install: not retried until the fleet names
    #: another package (a failed warm-up would fail again, in a loop).
    failedVersion: str = ""
    failedSha256: str = ""

    def inactive_slot(self) -> str:
        return "b" if self.current is not None and self.current.slot == "a" else "a"


def write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``path`` atomically (temp, fsync, rename), created with ``mode``."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)  # the rename itself survives a power cut
    finally:
        os.close(dfd)


def load_state(state_dir: Path) -> AgentState:
    try:
        return AgentState.model_validate_json((state_dir / STATE_FILE).read_bytes())
    except FileNotFoundError:
        return AgentState()
    except ValueError:
        log.error("%s is unreadable: starting with no installed version", STATE_FILE)
        return AgentState()


def save_state(state_dir: Path, state: AgentState) -> None:
    write_private(state_dir / STATE_FILE, state.model_dump_json(indent=1).encode())


def slot_dir(state_dir: Path, slot: str) -> Path:
    return state_dir / "slots" / slot


def recover(state_dir: Path) -> AgentState:
    """The state after a restart: an interrupted install is rolled back (its slot deleted),
    and a current slot whose files no longer match its manifest is not served."""
    state = load_state(state_dir)
    if state.pending is not None:
        log.warning("Install of %s was interrupted: rolling back to %s", state.pending.version,
                    state.current.version if state.current else "nothing")
        if state.current is None or state.pending.slot != state.current.slot:
            shutil.rmtree(slot_dir(state_dir, state.pending.slot), ignore_errors=True)
        state.pending = None
        save_state(state_dir, state)
    if state.current is not None:
        try:
            pkg.check_extracted(slot_dir(state_dir, state.current.slot))
        except pkg.PackageError as e:
            log.error("Slot %s (version %s) is damaged (%s): not serving it",
                      state.current.slot, state.current.version, e.message)
            state.current = None
            save_state(state_dir, state)
    for slot in SLOTS:  # anything in a slot that is not current is a leftover
        if state.current is None or slot != state.current.slot:
            shutil.rmtree(slot_dir(state_dir, slot), ignore_errors=True)
    shutil.rmtree(state_dir / "downloads", ignore_errors=True)
    return state


# -- download -----------------------------------------------------------------------------------

#: Sent with every request to the fleet: its replies must come as sent, undecoded. httpx
#: decodes a Content-Encoding (gzip, even ``gzip, gzip``) before any size check of ours
#: sees a byte, so a few MiB on the wire could expand to gigabytes in the agent's memory.
IDENTITY = {"accept-encoding": "identity"}


def check_identity(r: httpx.Response, what: str) -> None:
    """Refuse a reply with a Content-Encoding: the agent asked for ``identity`` and reads
    raw bytes, so an encoded reply is one it cannot bound (a decompression bomb)."""
    encoding = r.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        raise EdgeError(f"{what} came with Content-Encoding {encoding[:40]!r}, but the agent "
                        "asked for identity: refused (configure the fleet server or the proxy "
                        "in front of it not to compress device replies)")


async def raw_chunks(r: httpx.Response, chunk_size: int | None = None
                     ) -> AsyncIterator[bytes]:
    """A reply's bytes as sent, undecoded (after ``check_identity``). A reply that its
    transport handed over whole (httpx's ``MockTransport``) is in memory already: its
    content, as one chunk."""
    if r.is_stream_consumed:
        yield r.content
        return
    async for chunk in r.aiter_raw(chunk_size):
        yield chunk


async def download(client: httpx.AsyncClient, url: str, dest: Path, size: int,
                   headers: dict[str, str]) -> None:
    """Stream ``url`` into ``dest``, refusing more than ``size`` bytes (the announced size)
    and any Content-Encoding (read undecoded: ``check_identity``)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    got = 0
    try:
        async with client.stream("GET", url, headers={**headers, **IDENTITY}) as r:
            if r.status_code != 200:
                kind = TransientInstallError if r.status_code in _TRANSIENT_STATUS \
                    else InstallError
                raise kind(f"Package download answered HTTP {r.status_code}")
            check_identity(r, "Package download")
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                async for chunk in raw_chunks(r, 1 << 20):
                    got += len(chunk)
                    if got > size:
                        raise InstallError(f"Package download is larger than the announced "
                                           f"{size} bytes: refused")
                    os.write(fd, chunk)
            finally:
                os.close(fd)
    except httpx.HTTPError as e:
        raise TransientInstallError(f"Package download failed ({type(e).__name__})") from None


# -- the model-server child ---------------------------------------------------------------------


def reserve_port() -> socket.socket:
    """A loopback port held for a child to listen on: bound with SO_REUSEADDR, never listening.

    A port picked by binding port 0 and closing at once is free only until someone else
    binds port 0 (another agent's child, any process on the device): the kernel may hand
    it out again before the child binds it, and the child then exits unable to listen,
    which failed the install for good. While this socket is open the kernel gives the
    port to no other ``bind(0)`` nor outgoing connection, yet the child's own bind
    (uvicorn sets SO_REUSEADDR) and listen succeed. Closed once the child answers
    (``ModelChild.release_port``); an exception before that drops it with the object.
    """
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    return s


#: Environment variables the agent reads that its model server must not inherit.
AGENT_SECRETS = frozenset({"KUBEINFER_EDGE_BOOTSTRAP_TOKEN"})


def package_url(server: str, announced: str) -> tuple[str, bool]:
    """PURE: where to download an announced package, and whether the device's credential
    goes with the request: only to the fleet server's own origin. A path must start with
    ``/`` (``@evil.host/x`` appended to the server's URL would name another host); an
    absolute URL elsewhere (a CDN, a presigned link) gets no credential: the package is
    signed, so the credential is not what makes it trusted."""
    if announced.startswith(("http://", "https://")):
        own = urlsplit(server)
        there = urlsplit(announced)
        same = (there.scheme, there.hostname, there.port) == (own.scheme, own.hostname,
                                                              own.port)
        return announced, same and there.username is None
    if not announced.startswith("/"):
        raise InstallError(f"The fleet announced a package path that does not start with "
                           f"'/' ({len(announced)} characters): refused")
    return server.rstrip("/") + announced, True


def _die_with_agent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


@dataclass
class ModelChild:
    """One model server serving one slot."""

    proc: subprocess.Popen[bytes]
    port: int
    slot: str
    version: str
    #: Holds ``port`` until the child listens on it (``reserve_port``).
    reservation: socket.socket | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start(cls, state_dir: Path, slot: str, installed: Installed) -> ModelChild:
        reservation = reserve_port()
        port = int(reservation.getsockname()[1])
        root = slot_dir(state_dir, slot)
        env = {
            # The agent's own secrets stay with the agent: the model server runs a
            # package's code (a compiled model is a native library) and needs none.
            **{k: v for k, v in os.environ.items() if k not in AGENT_SECRETS},
            "KUBEINFER_HOST": "127.0.0.1",
            "KUBEINFER_PORT": str(port),
            "KUBEINFER_MODEL_URI": (root / installed.model).resolve().as_uri(),
            "KUBEINFER_MODEL_FORMAT": installed.format,
            "KUBEINFER_MODEL_NAME": "model",
            "KUBEINFER_WORKERS": "1",
            "KUBEINFER_MODEL_CACHE_DIR": str(state_dir / "cache"),
        }
        logs = state_dir / "logs"
        logs.mkdir(exist_ok=True)
        with open(logs / f"model-server-{slot}.log", "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "kubeinfer_runtime", "serve", "--role", "model-server"],
                env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_agent)
        log.info("Started model server for %s (slot %s) on port %d, pid %d",
                 installed.version, slot, port, proc.pid)
        return cls(proc, port, slot, installed.version, reservation)

    def release_port(self) -> None:
        """The child listens (or is stopping): the reservation is no longer needed."""
        if self.reservation is not None:
            self.reservation.close()
            self.reservation = None

    async def wait_ready(self, client: httpx.AsyncClient, within: float) -> None:
        deadline = time.monotonic() + within
        delay = 0.05
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise InstallError(f"Model server of {self.version} exited with code "
                                   f"{self.proc.returncode} before it was ready (see "
                                   f"logs/model-server-{self.slot}.log)")
            try:
                r = await client.get(self.url + "/ping", timeout=2.0)
            except httpx.HTTPError:
                pass
            else:
                if r.status_code == 200:
                    self.release_port()
                    return
                if LOAD_FAILED_MARKER in r.text:
                    # Failed for good: waiting out the timeout would only delay the report.
                    reason = ""
                    with contextlib.suppress(ValueError, AttributeError):
                        reason = str(r.json().get("message", ""))
                    raise InstallError(f"Model server of {self.version}: "
                                       f"{(reason or r.text)[:700]}")
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.5)
        raise InstallError(f"Model server of {self.version} was not ready within {within:.0f} "
                           f"s (see logs/model-server-{self.slot}.log)")

    async def warm_up(self, client: httpx.AsyncClient) -> None:
        """One inference built from the model's own metadata (zeros, dynamic dims as 1): a
        model that loads but cannot answer is caught before any caller sees it."""
        try:
            meta = await client.get(self.url + "/v2/models/model", timeout=WARMUP_TIMEOUT_S)
            if meta.status_code != 200:
                raise InstallError(f"Warm-up of {self.version}: model metadata answered HTTP "
                                   f"{meta.status_code}")
            request = warmup_request(meta.json())
            r = await client.post(self.url + "/v2/models/model/infer", json=request,
                                  timeout=WARMUP_TIMEOUT_S)
        except httpx.HTTPError as e:
            raise InstallError(f"Warm-up of {self.version} failed ({type(e).__name__})") \
                from None
        if r.status_code != 200:
            detail = ""
            with contextlib.suppress(ValueError):
                detail = str(r.json().get("error", ""))[:300]
            raise InstallError(f"Warm-up inference of {self.version} answered HTTP "
                               f"{r.status_code}: {detail}")

    async def stop(self) -> None:
        self.release_port()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.proc.wait, STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        await asyncio.to_thread(self.proc.wait)
        log.info("Stopped model server of %s (slot %s)", self.version, self.slot)


_ZERO: dict[str, Any] = {"BOOL": False, "BYTES": ""}


def warmup_request(metadata: dict[str, Any]) -> dict[str, Any]:
    """An Open Inference Protocol V2 request of zeros shaped by the model's declared inputs."""
    inputs = []
    for spec in metadata.get("inputs", []):
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in spec.get("shape") or [1]]
        count = 1
        for d in shape:
            count *= d
        if count > 1 << 20:
            raise InstallError(f"Warm-up input {str(spec.get('name'))[:40]!r} would hold "
                               f"{count} elements: too large to build")
        dtype = str(spec.get("datatype", "FP32"))
        inputs.append({"name": spec.get("name"), "shape": shape, "datatype": dtype,
                       "data": [_ZERO.get(dtype, 0)] * count})
    if not inputs:
        raise InstallError("Warm-up: the model declares no inputs")
    return {"inputs": inputs}
