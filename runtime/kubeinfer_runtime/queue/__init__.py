"""Asynchronous inference: a Redis Stream per endpoint between gateway and workers.

* ``request``: PURE — the queued request, header parsing, locations, notification bodies;
* ``producer``: the gateway side — idempotent enqueue (one Lua script);
* ``submit``: the gateway's raw ASGI handler of ``/endpoints/{name}/async-invocations``;
* ``objects``: read input / write output objects (``s3://`` or ``file://``);
* ``notifier``: webhook POSTs with retries and backoff;
* ``retry_policy``: PURE — failure classes, backoff with jitter, transient budget, breaker;
* ``processing``: one try at one request (state, inference, objects, notification, XACK);
* ``gate``: the worker's circuit breaker on the object store (probe, wake-up);
* ``inference_threads``: model calls on threads, each bounded by its own timeout;
* ``held_threads``: PURE — whether timed-out calls hold every thread (probes fail);
* ``worker``: XREADGROUP / XAUTOCLAIM loop, retry timing, circuit breaker, graceful drain;
* ``backlog``: the scaling signal (queued + in flight) read from Redis;
* ``app``: the async-worker role's process (``/ping``, ``/metrics``, the loop).
"""
