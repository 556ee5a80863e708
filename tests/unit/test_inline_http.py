"""Which path a request takes through ``InlineHttpProtocol``, seen from the transport.

The integration tests (tests/integration/test_inline_http.py) show that both
paths answer alike over real sockets; these show that the clean request really
is answered inline (one write, no ASGI task) and the rest really are not, by
driving uvicorn's protocol with a recording transport.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from uvicorn.config import Config
from uvicorn.server import ServerState

from kubeinfer_runtime.errors import NotReady
from kubeinfer_runtime.inline_http import InlineHttpProtocol, find_responder
from kubeinfer_runtime.metrics import ModelServerMetrics
from kubeinfer_runtime.models.base import Backend, ModelMetadata, Tensors, TensorSpec
from kubeinfer_runtime.server.hotpath import HotPath, InferenceService
from kubeinfer_runtime.server.state import LoadedModel, ModelSlot

META = ModelMetadata(inputs=(TensorSpec("x", np.dtype(np.float32), (None, 2)),),
                     outputs=(TensorSpec("y", np.dtype(np.float32), (None, 2)),),
                     platform="test")


class Doubler(Backend):
    def load(self, path: Path) -> None: ...

    def predict(self, inputs: Tensors, output_names: Sequence[str] | None = None) -> Tensors:
        return {"y": inputs["x"] * 2}

    def unload(self) -> None: ...

    def metadata(self) -> ModelMetadata:
        return META


class Recorder(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 5000), "sockname": ("127.0.0.1", 8080)}.get(
            name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def get_write_buffer_size(self) -> int:
        return 0  # everything written is taken at once

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


def _protocol(inline: bool = True) -> tuple[InlineHttpProtocol, Recorder, ServerState]:
    slot = ModelSlot("m", "file:///m")
    slot.model = LoadedModel(Doubler(), META, "0" * 64, inline=inline, warmup_s=None)
    service = InferenceService(slot, ModelServerMetrics("ep-inline", "v", "m"),
                               ThreadPoolExecutor(1), 1 << 20)

    async def fallback(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    config = Config(HotPath(fallback, service, "m"), http=InlineHttpProtocol, lifespan="off",
                    access_log=False)
    state = ServerState()
    proto = InlineHttpProtocol(config, state, {}, asyncio.get_running_loop())
    transport = Recorder()
    proto.connection_made(transport)
    return proto, transport, state


def _post(target: bytes, body: bytes) -> bytes:
    return (b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s"
            % (target, len(body), body))


def test_the_responder_is_found_behind_uvicorns_middleware() -> None:
    async def run() -> None:
        proto, _, _ = _protocol()
        # proxy_headers is on by default: the app is wrapped.
        assert type(proto.app).__name__ == "ProxyHeadersMiddleware"
        assert isinstance(find_responder(proto.app), HotPath)
    asyncio.run(run())


def test_a_clean_request_is_answered_in_one_write_without_a_task() -> None:
    async def run() -> None:
        proto, transport, state = _protocol()
        proto.data_received(_post(b"/invocations", b"[[1, 2]]"))
        assert len(transport.writes) == 1 and not state.tasks
        head, body = transport.writes[0].split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert orjson.loads(body) == {"predictions": [[2.0, 4.0]]}
        # Answered: the connection is idle, under the keep-alive timer again.
        assert proto.timeout_keep_alive_task is not None
        assert state.total_requests == 1
    asyncio.run(run())


def test_a_body_in_several_packets_is_still_answered_inline() -> None:
    async def run() -> None:
        proto, transport, state = _protocol()
        raw = _post(b"/invocations", b'{"instances": [[1, 2], [3, 4]]}')
        for i in range(0, len(raw), 5):
            proto.data_received(raw[i:i + 5])
        assert len(transport.writes) == 1 and not state.tasks
        assert transport.writes[0].endswith(b'{"predictions":[[2.0,4.0],[6.0,8.0]]}')
    asyncio.run(run())


def test_the_rest_takes_the_asgi_path() -> None:
    async def run() -> None:
        for raw in (_post(b"/invocations?x=1", b"[[1, 2]]"),  # a query string
                    _post(b"/other", b""),  # not an inference route
                    b"GET /invocations HTTP/1.1\r\nHost: t\r\n\r\n",  # 405, decided by ASGI
                    b"POST /invocations HTTP/1.1\r\nHost: t\r\nAccept: image/png\r\n"
                    b"Content-Length: 2\r\n\r\n[]",  # 406-like error from the headers
                    b"POST /invocations HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
                    b"Content-Length: 8\r\n\r\n[[1, 2]]",
                    b"POST /invocations HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked"
                    b"\r\n\r\n8\r\n[[1, 2]]\r\n0\r\n\r\n"):
            proto, transport, state = _protocol()
            proto.data_received(raw)
            assert len(state.tasks) == 1, raw  # an ASGI task is serving it
            await asyncio.gather(*state.tasks)
            assert len(transport.writes) == 2, raw  # uvicorn: head, then body
    asyncio.run(run())


def test_a_model_in_the_thread_pool_is_answered_inline_from_a_task() -> None:
    async def run() -> None:
        proto, transport, state = _protocol(inline=False)
        proto.data_received(_post(b"/invocations", b"[[1, 2]]")
                            + _post(b"/invocations", b"[[3, 4]]"))
        # The first is in flight in the pool; the second waits its turn.
        assert len(state.tasks) == 1 and transport.writes == []
        while state.tasks:
            await asyncio.gather(*state.tasks)
        # The first answered in one write; the second, queued behind it, by uvicorn.
        stream = b"".join(transport.writes)
        assert len(transport.writes) == 3 and stream.count(b"HTTP/1.1 200 OK") == 2
        assert stream.index(b"[[2.0,4.0]]") < stream.index(b"[[6.0,8.0]]")
    asyncio.run(run())


def test_a_pipelined_request_behind_an_inline_one_is_not_cut_by_the_keepalive_timer() -> None:
    async def run() -> None:
        proto, transport, state = _protocol()
        proto.data_received(_post(b"/invocations", b"[[1, 2]]")
                            + _post(b"/invocations?x=1", b"[[1, 2]]"))
        # The inline answer armed the idle timer; the next request disarmed it.
        assert len(transport.writes) == 1 and len(state.tasks) == 1
        assert proto.timeout_keep_alive_task is None
        await asyncio.gather(*state.tasks)
        assert len(transport.writes) == 3
    asyncio.run(run())


def test_shutdown_mid_body_answers_then_closes() -> None:
    async def run() -> None:
        proto, transport, _ = _protocol()
        raw = _post(b"/invocations", b"[[1, 2]]")
        proto.data_received(raw[:-3])
        proto.shutdown()
        assert not transport.closed
        proto.data_received(raw[-3:])
        assert b"\r\nconnection: close\r\n" in transport.writes[0] and transport.closed
    asyncio.run(run())


def test_a_client_gone_mid_body_counts_499() -> None:
    async def run() -> None:
        proto, transport, _ = _protocol()
        proto.data_received(_post(b"/invocations", b"[[1, 2]]")[:-3])
        proto.connection_lost(None)
        assert transport.writes == []
        responder = find_responder(proto.app)
        assert isinstance(responder, HotPath)
        assert responder.service.metrics._errors[499].value == 1
    asyncio.run(run())


def test_a_refused_upload_after_an_earlier_answer_still_gets_its_503() -> None:
    """The connection's cycle is the earlier request's, answered long ago: the upload
    refused (the process holds its bound of request bytes) is a new request, owed an
    answer of its own, not a bare close as if its own answer had begun."""
    async def run() -> None:
        for second in (_post(b"/invocations", b"[[1, 2]]")[:-3],  # inline, mid-body
                       b"POST /invocations HTTP/1.1\r\nHost: t\r\n"):  # mid-head
            proto, transport, state = _protocol()
            proto.data_received(_post(b"/other", b""))
            await asyncio.gather(*state.tasks)
            assert len(transport.writes) == 2  # uvicorn's 204: head, then body
            proto.data_received(second)
            assert proto.uploading
            proto._refuse_upload(NotReady("held"))
            assert len(transport.writes) == 3 and transport.closed, second
            assert transport.writes[2].startswith(b"HTTP/1.1 503 "), transport.writes[2]
            proto.connection_lost(None)
        # So is one whose body stalled (KUBEINFER_HTTP_BODY_TIMEOUT_S): a 408.
        proto, transport, state = _protocol()
        proto.data_received(_post(b"/other", b""))
        await asyncio.gather(*state.tasks)
        proto.data_received(_post(b"/invocations", b"[[1, 2]]")[:-3])
        proto._body_timeout("stalled")
        assert transport.writes[2].startswith(b"HTTP/1.1 408 "), transport.writes[2]
        proto.connection_lost(None)
        # But a request whose app answered before its body was whole only loses the
        # connection: a 408 after that answer would read as the next request's.
        proto, transport, state = _protocol()
        proto.data_received(_post(b"/other", b"[[1, 2]]")[:-3])
        await asyncio.gather(*state.tasks)
        assert len(transport.writes) == 2  # the app's 204, its body never read
        proto._body_timeout("stalled")
        assert len(transport.writes) == 2 and transport.closed
        proto.connection_lost(None)
    asyncio.run(run())


def test_a_uvicorn_without_the_parts_it_relies_on_means_plain_asgi(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import kubeinfer_runtime.inline_http as inline_http

    monkeypatch.setattr(inline_http, "_UVICORN_PARTS", (*inline_http._UVICORN_PARTS,
                                                        "a_part_from_the_future"))
    monkeypatch.setattr(inline_http, "_warned", False)

    async def run() -> None:
        proto, transport, state = _protocol()
        proto.data_received(_post(b"/invocations", b"[[1, 2]]"))
        assert len(state.tasks) == 1
        await asyncio.gather(*state.tasks)
        assert len(transport.writes) == 2
    with caplog.at_level(logging.WARNING, logger="kubeinfer.http"):
        asyncio.run(run())
    assert "a_part_from_the_future" in caplog.text
