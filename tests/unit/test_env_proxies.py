"""Calls to a container beside us never go through a proxy named in the environment.

Clusters often set HTTP_PROXY/HTTPS_PROXY in every pod (a mutating webhook, a
platform default) and devices in their shell. httpx honours them for any host,
127.0.0.1 included, so a pipeline's container steps, a batch job's image model, the
edge agent's model server child and a recommendation's candidates would have been
called through the proxy: the caller's data sent to it, or no answer at all. The
edge agent's fleet server (another host) still goes through the device's proxy.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from kubeinfer_runtime.batch.invoke import ImageModel
from kubeinfer_runtime.contract import PipelineStep
from kubeinfer_runtime.contract.batch import BatchSettings
from kubeinfer_runtime.edge import agent as agent_mod
from kubeinfer_runtime.edge.agent_proxy import Proxy
from kubeinfer_runtime.edge.capture_buffer import CaptureBuffer
from kubeinfer_runtime.pipeline.steps import UrlStep

PROXY = "http://proxy.example:3128"
LOCAL = httpx.URL("http://127.0.0.1:8081/invocations")


@pytest.fixture(autouse=True)
def _proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(name, PROXY)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)


def _proxied(client: httpx.Client | httpx.AsyncClient, url: httpx.URL) -> bool:
    transport = client._transport_for_url(url)
    return type(getattr(transport, "_pool", None)).__name__.endswith("Proxy")


def test_the_env_proxy_is_what_httpx_would_use() -> None:
    """The premise: a default client does send 127.0.0.1 to the env's proxy."""
    assert _proxied(httpx.Client(), LOCAL)


def test_container_steps_and_image_models_are_called_directly(tmp_path: Path) -> None:
    step = UrlStep(PipelineStep(name="c", url="http://127.0.0.1:8081"))
    assert not _proxied(step.client, LOCAL)
    model = ImageModel(BatchSettings(model_url="http://127.0.0.1:8081",
                                     input_uri="s3://in/", output_uri="s3://out/"))
    assert not _proxied(model.client, LOCAL)
    proxy = Proxy("dev-1", CaptureBuffer(tmp_path / "captures", 1 << 20))
    assert not _proxied(proxy._client, LOCAL)


def test_the_agent_reaches_its_child_directly_and_the_fleet_through_the_proxy(
        tmp_path: Path) -> None:
    agent = agent_mod.Agent(agent_mod.AgentConfig(
        server="http://fleet.example", device_id="dev-1", target="arm64",
        state_dir=tmp_path / "state", bootstrap_token="bootstrap-token-0123456789"))
    assert not _proxied(agent.client, LOCAL)
    assert _proxied(agent.client, httpx.URL("http://fleet.example/v1/heartbeat"))
