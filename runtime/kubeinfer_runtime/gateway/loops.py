"""The gateway's background loops: route-table reload and active health checks.

Thin on purpose: what to do with a file or a check result is decided by
``GatewayCore.reload`` / ``routefile`` and ``HealthTable``; these loops only
keep time and do the I/O. Neither may ever die: an unexpected exception is
logged and the loop goes on, because a gateway that stops reloading or checking
keeps serving stale routes silently.
"""

from __future__ import annotations

import asyncio
import logging

from kubeinfer_runtime.gateway import recorder
from kubeinfer_runtime.gateway.core import GatewayCore
from kubeinfer_runtime.gateway.health import Transition
from kubeinfer_runtime.gateway.upstream import UpstreamError

log = logging.getLogger("kubeinfer.gateway")

#: A /ping slower than this counts as a failed check.
HEALTH_TIMEOUT_S = 2.0


async def check_upstream(core: GatewayCore, url: str) -> None:
    """One active check of one upstream: ``GET /ping`` must answer 200."""
    timeout = min(HEALTH_TIMEOUT_S, max(core.settings.health_interval_s, 0.5))
    try:
        response = await core.client.request(url, b"GET", b"/ping", [], b"", timeout)
        ok, detail = response.status == 200, f"/ping answered {response.status}"
    except UpstreamError as exc:
        ok, detail = False, exc.detail
    transition = core.health.record_check(url, ok)
    if transition is Transition.WENT_DOWN:
        recorder.upstream_health(url, False)
        log.warning("Model server %s is out of rotation: %s", url, detail)
    elif transition is Transition.CAME_UP:
        recorder.upstream_health(url, True)
        log.info("Model server %s is back in rotation", url)


async def check_all(core: GatewayCore, urls: list[str] | None = None) -> None:
    targets = core.health.tracked() if urls is None else urls
    if targets:
        await asyncio.gather(*(check_upstream(core, u) for u in targets))


def reload_routes(core: GatewayCore) -> list[str]:
    """Poll the route table once; returns new upstreams, with their metric set up."""
    before = set(core.health.tracked())
    return _account(core, before, core.reload())


async def rediscover_routes(core: GatewayCore) -> list[str]:
    """Re-resolve per-pod upstreams once; returns new upstreams, with their metric set up."""
    before = set(core.health.tracked())
    return _account(core, before, await core.rediscover())


def _account(core: GatewayCore, before: set[str], added: list[str]) -> list[str]:
    for url in before - set(core.health.tracked()):
        recorder.forget_upstream(url)
    for url in added:
        recorder.upstream_health(url, True)
    return added


async def route_reload_loop(core: GatewayCore, wake_health: asyncio.Event) -> None:
    interval = core.settings.route_reload_interval_s
    while True:
        await asyncio.sleep(interval)
        try:
            added = reload_routes(core)
            added += await rediscover_routes(core)
            if added:
                wake_health.set()  # check new upstreams now, not a full interval later
        except Exception:
            log.exception("Route table reload failed unexpectedly: keeping the table in force")


async def health_loop(core: GatewayCore, wake: asyncio.Event) -> None:
    interval = core.settings.health_interval_s
    while True:
        try:
            await check_all(core)
        except Exception:
            log.exception("Health check round failed unexpectedly: trying again")
        wake.clear()
        try:
            async with asyncio.timeout(interval):
                await wake.wait()
        except TimeoutError:
            pass
