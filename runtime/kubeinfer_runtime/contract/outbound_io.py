"""The aiohttp connector that makes every outbound call obey ``contract.outbound``'s policy.

Split from the policy so importing the policy (the operator's settings, the
CLI, every ``kubeinfer`` command) does not import aiohttp: only the processes
that make outbound calls (async workers' notifier, the scalers) load it.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from kubeinfer_runtime.contract.outbound import (
    OutboundPolicy,
    OutboundRefused,
    address_problem,
    host_problem,
)


class GuardedResolver(AbstractResolver):
    """Resolves through ``inner`` (aiohttp's DefaultResolver), refusing refused destinations.

    Raises ``OutboundRefused`` when the name itself is refused or when ANY of
    its addresses is (a name answering with one good and one bad address is
    refused: the connector might pick either).
    """

    def __init__(self, policy: OutboundPolicy, inner: AbstractResolver | None = None) -> None:
        self.policy = policy
        self._inner = inner

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        problem = host_problem(host, self.policy)
        if problem is not None:
            raise OutboundRefused(problem)
        if self._inner is None:  # made here: it needs the running loop
            self._inner = DefaultResolver()
        results = await self._inner.resolve(host, port, family)
        for result in results:
            problem = address_problem(host, result["host"], self.policy)
            if problem is not None:
                raise OutboundRefused(problem)
        return results

    async def close(self) -> None:
        if self._inner is not None:
            await self._inner.close()


class GuardedConnector(aiohttp.TCPConnector):
    """A TCPConnector that also refuses literal-IP hosts.

    aiohttp never hands an IP literal (``169.254.169.254``, ``::ffff:a9fe:a9fe``)
    to the resolver (``TCPConnector._resolve_host`` answers it directly), so
    they are checked here, before that; names go on to ``GuardedResolver``.
    """

    def __init__(self, policy: OutboundPolicy, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.policy = policy

    async def _resolve_host(self, host: str, port: int,
                            traces: Sequence[Any] | None = None) -> list[ResolveResult]:
        problem = host_problem(host, self.policy)
        if problem is not None:
            raise OutboundRefused(problem)
        return await super()._resolve_host(host, port, traces=traces)


def guarded_connector(policy: OutboundPolicy, **connector_kwargs: Any) -> aiohttp.TCPConnector:
    """A TCPConnector whose every connection obeys ``policy``.

    A ``resolver`` in ``connector_kwargs`` is wrapped (tests inject a fake
    one). Refusals surface as ``aiohttp.ClientConnectorError`` whose
    ``os_error`` is an ``OutboundRefused`` carrying the reason.
    """
    inner = connector_kwargs.pop("resolver", None)
    return GuardedConnector(policy, resolver=GuardedResolver(policy, inner), **connector_kwargs)
