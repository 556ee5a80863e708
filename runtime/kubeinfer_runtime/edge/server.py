"""The fleet server's HTTP app: the device API of ``contract.edge`` (``create_app``).

``kubeinfer-runtime serve --role fleet-server`` runs ``create_app`` under uvicorn. The
routes are thin: authenticate, read a bounded body, validate it with the contract's
models, call ``FleetStore`` and answer; the rollout is decided by the controller loop
(``controller``, started in the lifespan), whose stored assignments the heartbeat
route hands out. Any replica answers any request: everything lives in Redis.

Callers are hostile until authenticated, and even then:

* bodies are read within ``MAX_DEVICE_REQUEST_BYTES`` / ``MAX_CAPTURE_UPLOAD_BYTES``
  (413 beyond, checked as bytes arrive), then validated field by field (400 naming
  the field; messages never quote tokens or body bytes);
* tokens are compared in constant time (the bootstrap and status tokens with
  ``hmac.compare_digest``; credentials by their sha256), and a wrong credential and
  an unknown device get the same 401; the status token (optional) authorizes the
  fleet-wide reads (``GET /v1/fleet``, ``GET /v1/devices``, ``GET /v1/devices/{id}/
  history``) and nothing else;
* path parameters must match ``NAME_PATTERN`` before they reach a Redis key or an
  object name; only the config's current and previous versions are downloadable;
* the bootstrap token registers new ids, up to ``max_devices`` (403 beyond), but an id
  already registered only with proof of its current credential
  (``DEVICE_CREDENTIAL_HEADER``) or once its device has been silent
  ``reregister_after_seconds`` (a reflashed device); otherwise 409, so whoever holds
  the bootstrap token cannot take over a live device;
* Redis or object-store outages answer 503, never 500.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import TypeVar

import orjson
from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from pydantic import ValidationError as PydanticValidationError

from kubeinfer_runtime import __version__, metrics
from kubeinfer_runtime.api_errors import (
    bounded_body,
    error_response,
    install_error_handlers,
)
from kubeinfer_runtime.contract.edge import (
    DEVICE_CREDENTIAL_HEADER,
    MAX_CAPTURE_UPLOAD_BYTES,
    MAX_DEVICE_REQUEST_BYTES,
    CaptureUploadResponse,
    DesiredState,
    DeviceHistory,
    DeviceList,
    DeviceSummary,
    FleetServerSettings,
    Heartbeat,
    HeartbeatResponse,
    RegisterRequest,
    RegisterResponse,
    valid_name,
)
from kubeinfer_runtime.contract.redact import redact_url
from kubeinfer_runtime.edge.blobs import Blobs, capture_uri
from kubeinfer_runtime.edge.controller import ConfigWatcher, Controller
from kubeinfer_runtime.edge.store import DeviceRecord, FleetStore
from kubeinfer_runtime.edge.waves import device_state, fleet_status
from kubeinfer_runtime.errors import (
    NotFound,
    NotReady,
    PayloadTooLarge,
    RuntimeServiceError,
    ValidationError,
)
from kubeinfer_runtime.openapi_docs import document_models, json_body, text_body

log = logging.getLogger("kubeinfer.edge")

M = TypeVar("M", bound=BaseModel)

#: ``GET /v1/devices``: the default and largest page.
DEFAULT_PAGE = 100
MAX_PAGE = 1000


class Unauthorized(RuntimeServiceError):
    """Missing or wrong bearer token (401; one message whatever was wrong)."""

    def __init__(self, message: str) -> None:
        super().__init__(401, "UnrecognizedClientException", message,
                         headers=[(b"www-authenticate", b"Bearer")])


class Throttled(RuntimeServiceError):
    """Too many capture uploads in flight (429): the agent keeps them for a later try."""

    def __init__(self, message: str) -> None:
        super().__init__(429, "ThrottlingException", message,
                         headers=[(b"retry-after", b"5")])


class FleetFull(RuntimeServiceError):
    """The fleet holds ``max_devices`` devices: a new id is refused (403)."""

    def __init__(self, message: str) -> None:
        super().__init__(403, "ResourceLimitExceeded", message)


def may_register_again(*, proved: bool, last_seen: float, now: float,
                       after_s: float) -> bool:
    """PURE: whether an id already registered may be registered again: by the device
    holding its current credential, or by anyone once the registered device has been
    silent longer than ``after_s`` (it is gone: a reflashed device lost its credential)."""
    return proved or now - last_seen > after_s


_BAD_CREDENTIAL = ("Device credential is missing or invalid: send Authorization: Bearer "
                   "<credential> from POST /v1/register, or register the device again")
_BAD_BOOTSTRAP = ("Bootstrap token is missing or invalid: send Authorization: Bearer <token> "
                  "with the fleet's bootstrap token")
_BAD_READER = ("Token is missing or invalid: send Authorization: Bearer <token> with the "
               "fleet's bootstrap token or status token")


def _reason(status: int) -> str:
    return {401: "unauthorized", 403: "forbidden", 404: "not_found", 409: "conflict",
            413: "too_large", 429: "throttled", 503: "unavailable"}.get(status, "invalid")


def _bearer(request: Request) -> str:
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _name(value: str, field: str) -> str:
    """A path parameter, validated before it reaches a key or an object name."""
    if not valid_name(value):
        raise ValidationError(f"Path parameter {field} is not a valid name: use 1-63 "
                              "lower-case letters, digits, '-', '.' or '_', starting and "
                              "ending with a letter or digit")
    return value


async def _body(request: Request, limit: int, what: str) -> bytes:
    """The request body within ``limit`` bytes (413 as soon as it is over)."""
    return await bounded_body(request, limit, PayloadTooLarge(
        f"{what} is over {limit} bytes: send less per request"))


def _parse(model: type[M], body: bytes, what: str) -> M:
    try:
        return model.model_validate_json(body)
    except PydanticValidationError as e:
        # loc and msg only: pydantic's "input" would quote the body.
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(body)'}: {err['msg']}"
            for err in e.errors(include_url=False, include_input=False)[:5])
        raise ValidationError(f"{what} is invalid ({problems}): fix the request body") from None


@contextlib.contextmanager
def _redis_guard() -> Iterator[None]:
    """Redis failures as 503 (the device retries on its next heartbeat), never a 500."""
    import redis.exceptions

    try:
        yield
    except redis.exceptions.RedisError as e:
        raise NotReady(f"Fleet server cannot reach its Redis ({type(e).__name__}): "
                       "retry later") from None


def _version_of(stored: str | None) -> str | None:
    """The version in a stored desired state (``FleetStore.all_desired``)."""
    return DesiredState.model_validate_json(stored).version if stored else None


def _json(model: BaseModel, status: int = 200) -> Response:
    return Response(model.model_dump_json(), status_code=status, media_type="application/json")


def _split_captures(body: bytes) -> list[bytes]:
    """The non-empty lines of a capture upload; each must be a JSON object."""
    lines: list[bytes] = []
    for number, line in enumerate(body.split(b"\n"), start=1):
        line = line.strip()
        if not line:
            continue
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise ValidationError(f"Capture upload line {number} is not JSON: send JSON "
                                  "Lines, one record object per line") from None
        if not isinstance(record, dict):
            raise ValidationError(f"Capture upload line {number} is not a JSON object: "
                                  "send one record object per line")
        lines.append(line)
    if not lines:
        raise ValidationError("Capture upload holds no records: send at least one JSON "
                              "object line")
    return lines


#: Capture uploads one fleet server process checks and writes at once (each holds a few
#: copies of up to ``MAX_CAPTURE_UPLOAD_BYTES``); one per device.
MAX_CAPTURE_UPLOADS_IN_FLIGHT = 16

#: The interpreter's thread switch interval in the fleet server process.
GIL_SLICE_S = 0.001
#: Connections to Redis per fleet server process, and how long a request waits for one.
REDIS_CONNECTIONS = 64
REDIS_WAIT_S = 10.0


def create_app(settings: FleetServerSettings | None = None) -> FastAPI:
    """uvicorn factory: settings from ``KUBEINFER_*`` env when None."""
    import redis.asyncio

    settings = settings or FleetServerSettings()  # type: ignore[call-arg]  # from env
    # The controller's tick computes over every device in a thread; the event loop waits
    # for the GIL at each await while it runs. 1 ms slices (not 5) keep a heartbeat's
    # handful of awaits from queueing behind it (p99 at 10,000 devices: docs/benchmarks.md).
    sys.setswitchinterval(GIL_SLICE_S)
    logging.getLogger("kubeinfer").setLevel(settings.log_level.upper())
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Raises at start on a bad config file: a fleet server without a config serves nothing.
    watcher = ConfigWatcher(settings.fleet_config_file)
    fleet = watcher.config.name
    # A bounded pool that makes requests wait for a connection: redis-py's default pool
    # refuses (MaxConnectionsError) past its size, which a burst of registrations hit.
    client = redis.asyncio.Redis(connection_pool=redis.asyncio.BlockingConnectionPool.from_url(
        settings.redis_url, decode_responses=True, max_connections=REDIS_CONNECTIONS,
        timeout=REDIS_WAIT_S))
    store = FleetStore(client, fleet, watcher.config.namespace,
                       history_length=settings.history_length)
    controller = Controller(store, watcher, interval_s=settings.controller_interval_seconds,
                            lease_s=settings.controller_lease_seconds)
    blobs = Blobs(settings.s3())
    bootstrap = settings.bootstrap_token.get_secret_value().encode()
    status_token = (settings.status_token.get_secret_value().encode()
                    if settings.status_token is not None else None)
    heartbeats = metrics.EDGE_HEARTBEATS.labels(fleet)
    registrations = metrics.EDGE_REGISTRATIONS.labels(fleet)
    captured = metrics.EDGE_CAPTURE_RECORDS.labels(fleet)
    uploads_in_flight = metrics.EDGE_CAPTURE_UPLOADS.labels(fleet)
    #: Devices whose capture upload this process is handling.
    uploading: set[str] = set()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        import asyncio

        task = asyncio.create_task(controller.run(), name="edge-controller")
        log.info("Fleet server for %s (version %s) on Redis %s", fleet,
                 watcher.config.current.version, redact_url(settings.redis_url))
        try:
            yield
        finally:
            await controller.stop()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await client.aclose()

    api = FastAPI(title="kubeinfer fleet server", version=__version__, lifespan=lifespan,
                  description="Edge fleets (SageMaker Edge Manager): the device API.")
    install_error_handlers(api, "the fleet server serves /v1/register, /v1/devices/{id}/"
                                "heartbeat, /v1/packages/{version}/{target}, /v1/fleet, "
                                "/v1/devices, /v1/devices/{id}/history (see /docs)")

    @api.exception_handler(RuntimeServiceError)
    async def _refused(request: Request, exc: RuntimeServiceError) -> Response:
        # Replaces install_error_handlers' handler to count refusals first.
        reason = _reason(exc.status)
        metrics.EDGE_REFUSED.labels(fleet, reason).inc()
        if exc.status != 503:
            with contextlib.suppress(Exception):
                await store.count(f"refused_{reason}")
        return error_response(exc)

    def _check_bootstrap(request: Request) -> None:
        if not hmac.compare_digest(_bearer(request).encode(), bootstrap):
            raise Unauthorized(_BAD_BOOTSTRAP)

    def _check_reader(request: Request) -> None:
        """The fleet-wide reads: the bootstrap token or the status token (both compared,
        so the time taken does not tell which one was tried)."""
        token = _bearer(request).encode()
        as_bootstrap = hmac.compare_digest(token, bootstrap)
        as_status = status_token is not None and hmac.compare_digest(token, status_token)
        if not (as_bootstrap or as_status):
            raise Unauthorized(_BAD_READER)

    async def _check_device(request: Request, device_id: str) -> None:
        token = _bearer(request)
        with _redis_guard():
            ok = bool(token) and await store.check_credential(device_id, token)
        if not ok:
            raise Unauthorized(_BAD_CREDENTIAL)

    @api.post("/v1/register", summary="Register a device (bootstrap token); returns its "
                                      "credential", response_model=RegisterResponse,
              openapi_extra=json_body(RegisterRequest))
    async def register(request: Request) -> Response:
        _check_bootstrap(request)
        body = await _body(request, MAX_DEVICE_REQUEST_BYTES, "Registration")
        req = _parse(RegisterRequest, body, "Registration")
        now = time.time()
        record = DeviceRecord(deviceId=req.deviceId, target=req.target, labels=req.labels,
                              agentVersion=req.agentVersion, registeredAt=now, lastSeen=now)
        presented = request.headers.get(DEVICE_CREDENTIAL_HEADER, "").strip()
        with _redis_guard():
            last_seen = await store.last_seen(req.deviceId)
            if last_seen is None:
                if await store.device_count() >= settings.max_devices:
                    raise FleetFull(f"Fleet {fleet} holds its maximum of "
                                    f"{settings.max_devices} devices: device {req.deviceId} "
                                    "is refused; raise KUBEINFER_MAX_DEVICES on the fleet "
                                    "server")
            else:
                # Always compared (constant time), proof or not.
                proved = await store.check_credential(req.deviceId, presented)
                if not may_register_again(proved=proved, last_seen=last_seen, now=now,
                                          after_s=settings.reregister_after_seconds):
                    log.warning("Fleet %s: registration of device %s refused: the id is "
                                "registered and active, and the request did not prove its "
                                "credential", fleet, req.deviceId)
                    raise ValidationError(
                        f"Device {req.deviceId} is already registered in fleet {fleet} and "
                        f"was seen within the last {settings.reregister_after_seconds:.0f} s: "
                        "register it again from the device holding its credential (sent in "
                        f"{DEVICE_CREDENTIAL_HEADER}), or wait until "
                        f"{settings.reregister_after_seconds:.0f} s after the old device "
                        "stopped (KUBEINFER_REREGISTER_AFTER_SECONDS)", status=409)
            credential = await store.register(record)
        registrations.inc()
        config = watcher.config
        log.info("Fleet %s: device %s registered (target %s)", fleet, req.deviceId, req.target)
        return _json(RegisterResponse(deviceId=req.deviceId, credential=credential,
                                      heartbeatIntervalSeconds=config.heartbeatIntervalSeconds,
                                      publicKey=config.publicKey, fleet=fleet))

    @api.post("/v1/devices/{device_id}/heartbeat", response_model=HeartbeatResponse,
              summary="A device's heartbeat (credential); returns its desired state",
              openapi_extra=json_body(Heartbeat))
    async def heartbeat(device_id: str, request: Request) -> Response:
        _name(device_id, "deviceId")
        await _check_device(request, device_id)
        body = await _body(request, MAX_DEVICE_REQUEST_BYTES, "Heartbeat")
        hb = _parse(Heartbeat, body, "Heartbeat")
        with _redis_guard():
            record = await store.heartbeat(device_id, hb)
            desired = await store.desired(device_id)
        if record is None:  # credential without a record: only if Redis lost the record
            raise Unauthorized(_BAD_CREDENTIAL)
        heartbeats.inc()
        config = watcher.config
        return _json(HeartbeatResponse(desired=desired,
                                       heartbeatIntervalSeconds=config.heartbeatIntervalSeconds,
                                       capture=config.capture))

    @api.get("/v1/packages/{version}/{target}",
             summary="Download a package (credential): the config's current and previous "
                     "versions only")
    async def package(version: str, target: str, request: Request) -> Response:
        _name(version, "version")
        _name(target, "target")
        token = _bearer(request)
        with _redis_guard():
            owner = await store.credential_owner(token) if token else None
        if owner is None:
            raise Unauthorized(_BAD_CREDENTIAL)
        config = watcher.config
        ref = next((v.packages.get(target) for v in (config.current, config.previous)
                    if v is not None and v.version == version), None)
        if ref is None:
            raise NotFound(f"No package of version {version} for target {target} in fleet "
                           f"{fleet}: the fleet serves versions {config.current.version}"
                           + (f" and {config.previous.version}" if config.previous else ""))
        size, chunks = await blobs.open_package(version, target, ref)
        headers = {"x-kubeinfer-sha256": ref.sha256}
        if size >= 0:
            headers["content-length"] = str(size)
        return StreamingResponse(chunks, media_type="application/octet-stream",
                                 headers=headers)

    @api.post("/v1/devices/{device_id}/captures", response_model=CaptureUploadResponse,
              summary="Upload capture records (credential): JSON Lines, one object each",
              openapi_extra=text_body(
                  "application/jsonl", "Capture records as JSON Lines: one JSON object per "
                  "line (SageMaker's capture format, as the agent buffers them)."))
    async def captures(device_id: str, request: Request) -> Response:
        _name(device_id, "deviceId")
        await _check_device(request, device_id)
        # An upload holds up to a few copies of 8 MiB while it is checked and written:
        # one at a time per device, and a bound per process, so no device (nor a
        # thousand at once) can hold the server's memory. The agent keeps its records
        # on any refusal and sends them with a later heartbeat.
        if device_id in uploading or len(uploading) >= MAX_CAPTURE_UPLOADS_IN_FLIGHT:
            raise Throttled(f"A capture upload of device {device_id} is in flight, or the "
                            f"server holds {MAX_CAPTURE_UPLOADS_IN_FLIGHT} already: send it "
                            "again later")
        uploading.add(device_id)
        uploads_in_flight.set(len(uploading))
        try:
            return await _capture(device_id, request)
        finally:
            uploading.discard(device_id)
            uploads_in_flight.set(len(uploading))

    async def _capture(device_id: str, request: Request) -> Response:
        body = await _body(request, MAX_CAPTURE_UPLOAD_BYTES, "Capture upload")
        lines = _split_captures(body)
        destination = watcher.config.capture.destination
        if not destination:
            raise ValidationError(f"Fleet {fleet} has no capture destination: set "
                                  "spec.capture.destination, or stop sampling on devices",
                                  status=409)
        uri = capture_uri(destination, fleet, device_id, time.time())
        await blobs.write_capture(uri, b"\n".join(lines) + b"\n")
        captured.inc(len(lines))
        return _json(CaptureUploadResponse(accepted=len(lines), uri=uri))

    @api.get("/v1/fleet", summary="The fleet's status (bootstrap or status token)")
    async def fleet_view(request: Request) -> Response:
        _check_reader(request)
        with _redis_guard():
            state = await store.rollout()
            records = await store.devices()
            counters = await store.counters()
        status = fleet_status(watcher.config, state, [r.view() for r in records], time.time(),
                              counters)
        return _json(status)

    @api.get("/v1/devices", summary="Devices, by id, a page at a time (bootstrap or status "
                                    "token)")
    async def devices(request: Request) -> Response:
        _check_reader(request)
        raw_limit = request.query_params.get("limit", str(DEFAULT_PAGE))
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_PAGE:
            raise ValidationError(f"Query parameter limit must be an integer from 1 to "
                                  f"{MAX_PAGE}")
        limit = int(raw_limit)
        after = request.query_params.get("after")
        if after is not None:
            _name(after, "after")
        with _redis_guard():
            state = await store.rollout()
            records = await store.devices()
            desired = await store.all_desired()
        config, now = watcher.config, time.time()
        page = [r for r in records if after is None or r.deviceId > after]
        more = len(page) > limit
        page = page[:limit]
        summaries = [DeviceSummary(
            deviceId=r.deviceId, target=r.target, labels=r.labels,
            state=device_state(config, state, r.view(), now),
            version=r.heartbeat.version if r.heartbeat else "",
            desiredVersion=_version_of(desired.get(r.deviceId)), lastSeen=r.lastSeen,
            lastDeployment=r.heartbeat.lastDeployment if r.heartbeat else None)
            for r in page]
        return _json(DeviceList(devices=summaries,
                                next=page[-1].deviceId if more and page else None))

    @api.get("/v1/devices/{device_id}/history", response_model=DeviceHistory,
             summary="A device's recent versions and deployment results, newest first "
                     "(bootstrap or status token)")
    async def device_history(device_id: str, request: Request) -> Response:
        _check_reader(request)
        _name(device_id, "deviceId")
        with _redis_guard():
            record = await store.device(device_id)
            entries = await store.history(device_id) if record is not None else []
        if record is None:
            raise NotFound(f"No device {device_id!r} is registered in fleet "
                           f"{fleet}")
        return _json(DeviceHistory(deviceId=device_id, entries=entries))

    @api.get("/ping", summary="Ready while Redis answers")
    async def ping() -> Response:
        try:
            await client.ping()
        except Exception as e:
            return error_response(NotReady(f"Fleet server cannot reach Redis at "
                                           f"{redact_url(settings.redis_url)} "
                                           f"({type(e).__name__}): check KUBEINFER_REDIS_URL"))
        body = orjson.dumps({"status": "ok", "fleet": fleet,
                             "version": watcher.config.current.version,
                             "leader": controller.leader})
        return Response(body, media_type="application/json")

    @api.get("/metrics", summary="Prometheus metrics")
    async def prometheus() -> Response:
        body, content_type = metrics.render_latest()
        return Response(body, media_type=content_type)

    api.state.controller = controller
    api.state.store = store
    # The device API's bodies are read by hand (bounded, refusals worded): name their models.
    document_models(api, [RegisterRequest, Heartbeat])
    return api
