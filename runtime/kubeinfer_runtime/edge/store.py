"""The fleet server's durable state in Redis: the only module that talks to Redis.

Every replica of the fleet server shares one Redis, so a restart or a second replica
loses nothing and sees everything. Keys of one fleet share the hash tag
``{namespace/name}`` so they sit in one slot (a Redis Cluster runs the controller's
atomic write too):

* ``edge:{f}:devices``    hash, device id -> :class:`DeviceRecord` JSON. Written only by
  that device's own registration and heartbeats;
* ``edge:{f}:credentials`` hash, device id -> sha256 of its credential. The
  credentials are 32 random bytes, so a plain sha256 is as good as a slow hash here;
  ``edge:{f}:owners`` maps that sha256 back to the device, for routes whose path names
  no device (the package download);
* ``edge:{f}:desired``    hash, device id -> the ``DesiredState`` JSON a heartbeat answers
  ("" for none): the package reference itself, so every replica answers the same even
  while their copies of the config file differ for a moment. Written only by the
  controller holding the lease, together with
* ``edge:{f}:rollout``    the rollout state (``waves.RolloutState`` JSON);
* ``edge:{f}:history:<id>`` list, newest first, capped: the device's version and
  deployment-result changes;
* ``edge:{f}:counters``   hash of counters (heartbeats, registrations, refused_*);
* ``edge:{f}:lease``      the controller lease: a random token, with a TTL.

The controller's write is one Lua script that checks the lease token first, so a
replica that lost its lease (paused, partitioned) can never overwrite the state the
new holder wrote.

A stored device record that does not parse (written by an older server that accepted
a non-finite number, or edited by hand) costs that device alone: the fleet-wide
readers skip it with one warning naming the device, and the device's own next
heartbeat or registration rewrites it from what can still be read.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import time
from collections.abc import Mapping
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kubeinfer_runtime.contract.edge import (
    DesiredState,
    Heartbeat,
    HistoryEntry,
)
from kubeinfer_runtime.edge.waves import DeviceView, RolloutState

log = logging.getLogger("kubeinfer.edge")

#: Heartbeat fields that make a history entry when they change.
_HISTORY_FIELDS = ("version", "updatingTo")

_WRITE_ROLLOUT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2])
for i = 3, #ARGV, 2 do
  if ARGV[i + 1] == '\\0' then
    redis.call('HDEL', KEYS[3], ARGV[i])
  else
    redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
  end
end
return 1
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
#: Marks a desired-hash field to delete in ``_WRITE_ROLLOUT`` (no version contains NUL).
_DELETE = "\0"
#: A stored credential hash that matches nothing, compared against when a device is
#: unknown so both cases take the same time.
_NO_HASH = "0" * 64


class DeviceRecord(BaseModel):
    """A registered device, as its own requests last described it."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    deviceId: str
    target: str
    labels: dict[str, str] = Field(default_factory=dict)
    agentVersion: str = ""
    registeredAt: float
    lastSeen: float
    heartbeat: Heartbeat | None = None

    def view(self) -> DeviceView:
        hb = self.heartbeat or Heartbeat()
        return DeviceView(self.deviceId, self.target, dict(self.labels), version=hb.version,
                          updating=hb.updating, updating_to=hb.updatingTo,
                          last_deployment=hb.lastDeployment, last_seen=self.lastSeen,
                          registered_at=self.registeredAt)


def _salvage(raw: str) -> DeviceRecord | None:
    """What can still be read of a stored record that does not parse: its identity and
    times without the last heartbeat (the part its device writes), or None."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    data.pop("heartbeat", None)
    try:
        return DeviceRecord.model_validate(data)
    except ValidationError:
        return None


def hash_credential(credential: str) -> str:
    return hashlib.sha256(credential.encode()).hexdigest()


def new_credential() -> str:
    return secrets.token_urlsafe(32)


class FleetStore:
    """One fleet's keys in one Redis; every method is one or two round trips."""

    def __init__(self, client: Any, fleet: str, namespace: str = "default",
                 *, history_length: int = 50) -> None:
        #: A ``redis.asyncio.Redis`` with ``decode_responses=True`` (typed Any: redis-py's
        #: annotations make every call ``Awaitable[...] | ...``).
        self.redis: Any = client
        self.fleet = fleet
        self.history_length = history_length
        prefix = f"edge:{{{namespace}/{fleet}}}:"
        self.k_devices = prefix + "devices"
        self.k_credentials = prefix + "credentials"
        self.k_owners = prefix + "owners"
        self.k_desired = prefix + "desired"
        self.k_rollout = prefix + "rollout"
        self.k_counters = prefix + "counters"
        self.k_lease = prefix + "lease"
        self._history_prefix = prefix + "history:"
        self._write_rollout = client.register_script(_WRITE_ROLLOUT)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        #: Devices whose stored record did not parse, already warned about (once each,
        #: until a record of theirs parses again): a fleet-wide read every second must not
        #: log every second.
        self._unreadable: set[str] = set()
        #: The controller's thread and the event loop both parse records: the check and
        #: the add are one step, or both could warn about the same device.
        self._unreadable_lock = threading.Lock()

    def k_history(self, device_id: str) -> str:
        return self._history_prefix + device_id

    # -- devices -------------------------------------------------------------------------------

    def parse_record(self, device_id: str, raw: str) -> DeviceRecord | None:
        """A stored record, or None (with one warning per device) when it does not parse.

        Pure CPU and safe from a thread (the controller parses in one)."""
        try:
            record = DeviceRecord.model_validate_json(raw)
        except ValidationError as e:
            with self._unreadable_lock:
                first = device_id not in self._unreadable
                self._unreadable.add(device_id)
            if first:
                # The device id and the count only: the stored bytes are device input.
                log.warning("Fleet %s: the stored record of device %s cannot be read (%d "
                            "problem(s)): left out of the fleet's views until its next "
                            "heartbeat or registration rewrites it", self.fleet, device_id,
                            e.error_count())
            return None
        if device_id in self._unreadable:
            with self._unreadable_lock:
                self._unreadable.discard(device_id)
        return record

    async def register(self, record: DeviceRecord) -> str:
        """Store the device and a new credential (rotating any old one); return it."""
        credential = new_credential()
        digest = hash_credential(credential)
        old_raw = await self.redis.hget(self.k_devices, record.deviceId)
        if old_raw is not None:
            # Re-registration keeps when the device first joined (its wave may depend on it).
            # A record that does not parse is rewritten from what can still be read of it.
            old = self.parse_record(record.deviceId, old_raw) or _salvage(old_raw)
            if old is not None:
                record = record.model_copy(update={"registeredAt": old.registeredAt,
                                                   "heartbeat": old.heartbeat})
        old_digest = await self.redis.hget(self.k_credentials,
                                           record.deviceId)
        async with self.redis.pipeline(transaction=True) as pipe:
            if old_digest is not None:
                pipe.hdel(self.k_owners, old_digest)
            pipe.hset(self.k_devices, record.deviceId, record.model_dump_json())
            pipe.hset(self.k_credentials, record.deviceId, digest)
            pipe.hset(self.k_owners, digest, record.deviceId)
            pipe.hincrby(self.k_counters, "registrations", 1)
            await pipe.execute()
        return credential

    async def check_credential(self, device_id: str, credential: str) -> bool:
        """Whether ``credential`` is ``device_id``'s, compared in constant time."""
        stored = await self.redis.hget(self.k_credentials, device_id)
        return hmac.compare_digest(hash_credential(credential).encode(),
                                   (stored or _NO_HASH).encode()) and stored is not None

    async def credential_owner(self, credential: str) -> str | None:
        """The device a credential belongs to, or None."""
        owner = await self.redis.hget(self.k_owners,
                                      hash_credential(credential))
        return str(owner) if owner is not None else None

    async def device(self, device_id: str) -> DeviceRecord | None:
        """The device's record; one that does not parse comes back without its last
        heartbeat (None only when not even its identity can be read)."""
        raw = await self.redis.hget(self.k_devices, device_id)
        if raw is None:
            return None
        return self.parse_record(device_id, raw) or _salvage(raw)

    async def last_seen(self, device_id: str) -> float | None:
        """When the device was last heard from; None when it is not registered, 0.0 when
        its record cannot be read (which proves no recent activity)."""
        raw = await self.redis.hget(self.k_devices, device_id)
        if raw is None:
            return None
        record = self.parse_record(device_id, raw) or _salvage(raw)
        return record.lastSeen if record is not None else 0.0

    async def device_count(self) -> int:
        return int(await self.redis.hlen(self.k_devices))

    async def devices(self) -> list[DeviceRecord]:
        """Every device that parses, by id (the others are skipped, see ``parse_record``)."""
        raw = await self.raw_devices()
        parsed = (self.parse_record(k, v) for k, v in sorted(raw.items()))
        return [r for r in parsed if r is not None]

    async def raw_devices(self) -> Mapping[str, str]:
        """Every device's stored JSON, by id (the controller parses what changed)."""
        raw: Mapping[str, str] = await self.redis.hgetall(self.k_devices)
        return raw

    async def heartbeat(self, device_id: str, heartbeat: Heartbeat,
                        now: float | None = None) -> DeviceRecord | None:
        """Record a heartbeat (and a history entry when the version or result changed)."""
        now = time.time() if now is None else now
        record = await self.device(device_id)
        if record is None:
            return None
        before = record.heartbeat
        record = record.model_copy(update={"heartbeat": heartbeat, "lastSeen": now})
        changed = before is None or any(
            getattr(before, f) != getattr(heartbeat, f) for f in _HISTORY_FIELDS) or (
            before.lastDeployment != heartbeat.lastDeployment)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.k_devices, device_id, record.model_dump_json())
            pipe.hincrby(self.k_counters, "heartbeats", 1)
            if changed:
                entry = HistoryEntry(at=now, version=heartbeat.version,
                                     updatingTo=heartbeat.updatingTo,
                                     lastDeployment=heartbeat.lastDeployment)
                pipe.lpush(self.k_history(device_id), entry.model_dump_json())
                pipe.ltrim(self.k_history(device_id), 0, self.history_length - 1)
            await pipe.execute()
        return record

    async def history(self, device_id: str) -> list[HistoryEntry]:
        """The device's entries, newest first; one that does not parse is left out."""
        raw: list[str] = await self.redis.lrange(
            self.k_history(device_id), 0, -1)
        entries = []
        for r in raw:
            try:
                entries.append(HistoryEntry.model_validate_json(r))
            except ValidationError:
                log.warning("Fleet %s: a stored history entry of device %s cannot be read: "
                            "left out", self.fleet, device_id)
        return entries

    # -- the rollout ---------------------------------------------------------------------------

    async def desired(self, device_id: str) -> DesiredState | None:
        """What the controller last chose for the device (None: nothing yet, or nothing)."""
        raw = await self.redis.hget(self.k_desired, device_id)
        return DesiredState.model_validate_json(raw) if raw else None

    async def all_desired(self) -> dict[str, str]:
        """Device id -> the stored desired state, as stored (JSON, or "" for none)."""
        raw: dict[str, str] = await self.redis.hgetall(self.k_desired)
        return raw

    async def rollout(self) -> RolloutState | None:
        raw = await self.redis.get(self.k_rollout)
        return RolloutState.model_validate_json(raw) if raw is not None else None

    async def write_rollout(self, token: str, state: RolloutState,
                            desired: Mapping[str, str], stored: Mapping[str, str]) -> bool:
        """Store the state and the desired states that changed from ``stored`` (values as
        :meth:`all_desired` gives them), only if ``token`` still holds the lease (False, and
        nothing written, otherwise)."""
        args: list[str] = [token, state.model_dump_json()]
        for device_id, value in desired.items():
            if stored.get(device_id) != value:
                args += [device_id, value]
        for device_id in stored.keys() - desired.keys():
            args += [device_id, _DELETE]
        done = await self._write_rollout(keys=[self.k_lease, self.k_rollout, self.k_desired],
                                         args=args)
        return bool(done)

    # -- the lease -----------------------------------------------------------------------------

    async def acquire_lease(self, token: str, seconds: float) -> bool:
        """Take the lease if free, or renew it if ``token`` holds it."""
        ms = max(1, int(seconds * 1000))
        if await self._renew(keys=[self.k_lease], args=[token, ms]):
            return True
        return bool(await self.redis.set(self.k_lease, token, nx=True, px=ms))

    async def release_lease(self, token: str) -> None:
        await self._release(keys=[self.k_lease], args=[token])

    async def lease_holder(self) -> str | None:
        value = await self.redis.get(self.k_lease)
        return str(value) if value is not None else None

    # -- counters ------------------------------------------------------------------------------

    async def count(self, name: str, amount: int = 1) -> None:
        await self.redis.hincrby(self.k_counters, name, amount)

    async def counters(self) -> dict[str, int]:
        raw: Mapping[str, str] = await self.redis.hgetall(self.k_counters)
        return {k: int(v) for k, v in sorted(raw.items())}
