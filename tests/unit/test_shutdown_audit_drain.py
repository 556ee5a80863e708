"""A runtime server stopped by SIGTERM drains every request it may legitimately be running.

uvicorn cancels what is still in flight after ``GRACEFUL_SHUTDOWN_S`` (the client gets a
bare 500). A real-time request may run as long as the gateway waits for its model server
(``upstream_timeout_s``, SageMaker's 60 s): a shorter drain cuts such requests in every
rolling update and scale-down, at the gateway and at the model server alike.
"""

from __future__ import annotations

from kubeinfer_runtime.contract import GRACEFUL_SHUTDOWN_S, GatewaySettings


def test_the_drain_outlasts_the_longest_real_time_request() -> None:
    upstream_timeout_s = GatewaySettings.model_fields["upstream_timeout_s"].default
    assert upstream_timeout_s <= GRACEFUL_SHUTDOWN_S
