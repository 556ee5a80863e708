"""PURE: a model server's memory limit, and whether a measured size breaks it.

On Kubernetes a container that goes over its memory limit is OOMKilled by the
kernel and restarted by the kubelet. Local mode does the same, so a model that
cannot fit in its limit fails on the laptop first, not in production: the
supervisor measures each model server (``rss``, the I/O half) and asks
``judge`` what to do. No I/O and no clock here, so the rules are unit-tested
without starting anything.

The limit is the one the rendered Deployment would carry: the variant's
``resources.limits.memory``, else, for Serverless endpoints, ``serverless.memory``
(``render.plan`` folds the latter into the variant's limits). No limit: no
enforcement. CPU limits are not enforced locally (see README, Limits).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from kubeinfer_operator.reconcile.quantity import parse_quantity

#: Kubernetes' lastState.terminated.reason of a container killed for its memory.
OOM_KILLED = "OOMKilled"
#: ... of one that exited non-zero (a crash, or killed by someone else).
ERROR = "Error"
#: ... of one that exited with status 0.
COMPLETED = "Completed"

_VARIANT_FIELD = "resources.limits.memory"
_SERVERLESS_FIELD = "serverless.memory"


@dataclass(frozen=True)
class MemoryLimit:
    """A replica's memory limit: bytes, as written, and the spec field it came from."""

    bytes: int
    text: str
    field: str


@dataclass(frozen=True)
class Verdict:
    """What to do with a process that uses ``rss_bytes``: kill it or leave it."""

    kill: bool
    #: Why, for the event and ``status`` ("" when not killed): the numbers and the fix.
    message: str = ""


def limit_bytes(text: str) -> int | None:
    """Bytes of a memory quantity, rounded up as Kubernetes does (``100m`` → 1);
    None when ``text`` is not a quantity or is negative."""
    value = parse_quantity(text)
    if value is None or value < 0:
        return None
    return math.ceil(value)


def limit_problem(path: str, text: str) -> str | None:
    """Why a memory limit at ``path`` cannot be enforced, or None when it can."""
    value = parse_quantity(text)
    if value is None:
        return f"{path}: {text!r} is not a Kubernetes quantity; write it like 512Mi or 2Gi"
    if value < 0:
        return f"{path}: {text!r} is negative; write a size like 512Mi, or remove the limit"
    return None


def memory_limit(limits: Mapping[str, str], serverless_memory: str | None) -> MemoryLimit | None:
    """The limit to enforce for a variant's replicas; None: no enforcement.

    ``limits`` are the variant plan's (already holding ``serverless.memory`` when the
    variant sets no memory limit of its own). An equal value on a Serverless
    endpoint is credited to ``serverless.memory``: that is where it came from
    unless the variant repeats the same number, and then either names it.
    A limit of 0 means none, as for the kubelet; an unparsable one is refused
    before the supervisor runs (``manifest.local_problems``), and ignored here.
    """
    text = limits.get("memory")
    if text is None:
        return None
    size = limit_bytes(text)
    if not size:
        return None
    from_serverless = serverless_memory is not None and text == serverless_memory
    return MemoryLimit(bytes=size, text=text,
                       field=_SERVERLESS_FIELD if from_serverless else _VARIANT_FIELD)


def format_bytes(size: int) -> str:
    """A size in Kubernetes binary units: ``612Mi``, ``41.3Mi``, ``2.5Gi``."""
    mib = size / 2**20
    if mib >= 10 * 1024:
        return f"{size / 2**30:.1f}Gi"
    if mib >= 100:
        return f"{mib:.0f}Mi"
    return f"{mib:.1f}Mi"


def judge(rss_bytes: int | None, limit: MemoryLimit | None) -> Verdict:
    """Kill when the process uses more than its limit (a cgroup lets usage reach the
    limit itself, then the kernel kills). Unknown usage (gone) or no limit: leave it."""
    if rss_bytes is None or limit is None or rss_bytes <= limit.bytes:
        return Verdict(kill=False)
    return Verdict(kill=True, message=(
        f"using {format_bytes(rss_bytes)}, over its memory limit {limit.text} ({limit.field}); "
        "raise the limit or use a smaller model"))


def oom_event(verdict: Verdict, *, process: str, variant: str | None,
              replica: int | None) -> str:
    """The event line of an OOM kill, naming the variant's replica (else the process)."""
    who = (f"Variant {variant} replica {replica}" if variant is not None and replica is not None
           else f"Process {process}")
    return f"{who}: {OOM_KILLED}: {verdict.message}"


def termination_reason(returncode: int, *, oom_killed: bool) -> str:
    """lastState.terminated.reason of a process that exited with ``returncode``."""
    if oom_killed:
        return OOM_KILLED
    return COMPLETED if returncode == 0 else ERROR
