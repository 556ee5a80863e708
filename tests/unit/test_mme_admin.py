"""The multi-model server's admin route ``POST /models`` (``KUBEINFER_ADMIN_API=true``)
bounds what it reads and never echoes what the caller sent.

Called as ASGI with a stand-in cache (no model store, no sockets): the body
arrives in chunks, as a client streaming it would send it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI

from kubeinfer_runtime.server.multimodel_app import MAX_LOAD_BODY_BYTES, build_multimodel_api
from kubeinfer_runtime.storage.target import parse_prefix


class FakeCache:
    def __init__(self) -> None:
        self.preloaded: list[str] = []

    def is_loaded(self, name: str) -> bool:
        return name in self.preloaded

    def loaded(self) -> list[tuple[str, Any]]:
        return []

    async def preload(self, name: str) -> bool:
        self.preloaded.append(name)
        return True


@asynccontextmanager
async def _lifespan(_: FastAPI) -> AsyncIterator[None]:
    yield


def _app(cache: FakeCache) -> FastAPI:
    return build_multimodel_api(cache, parse_prefix("s3://bucket/models/"),  # type: ignore[arg-type]
                                _lifespan, admin=True)


def post(app: FastAPI, body: bytes, *, chunk: int = 1 << 16,
         headers: list[tuple[bytes, bytes]] | None = None) -> tuple[int, dict[str, Any], int]:
    """Status, parsed JSON answer, and how many body bytes the app asked for."""
    chunks = [body[i:i + chunk] for i in range(0, len(body), chunk)] or [b""]
    read = 0
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal read
        if not chunks:
            return {"type": "http.disconnect"}
        part = chunks.pop(0)
        read += len(part)
        return {"type": "http.request", "body": part, "more_body": bool(chunks)}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "path": "/models", "raw_path": b"/models", "query_string": b"",
             "root_path": "", "scheme": "http",
             "headers": [(b"content-type", b"application/json"), *(headers or [])],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8080)}
    asyncio.run(app(scope, receive, send))
    answer = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], orjson.loads(answer), read


def test_a_body_over_the_limit_is_413_naming_it_and_not_read_further() -> None:
    cache = FakeCache()
    app = _app(cache)
    big = orjson.dumps({"model_name": "m.onnx", "url": "A" * (4 * MAX_LOAD_BODY_BYTES)})
    status, doc, read = post(app, big, chunk=4096)
    assert status == 413 and f"{MAX_LOAD_BODY_BYTES} bytes" in doc["Message"]
    assert read <= MAX_LOAD_BODY_BYTES + 4096 and "AAAA" not in doc["Message"]
    declared = [(b"content-length", str(len(big)).encode())]
    status, doc, read = post(app, big, headers=declared)
    assert status == 413 and read == 0  # refused on the declared length alone
    assert cache.preloaded == []


def test_the_name_is_checked_before_any_message_quotes_it() -> None:
    status, doc, _ = post(_app(FakeCache()),
                          orjson.dumps({"model_name": "x" * 5000, "url": "other"}))
    assert status == 400 and "longer than 1024 characters" in doc["Message"]
    assert len(doc["Message"]) < 400


def test_a_wrong_url_is_described_not_echoed() -> None:
    cache = FakeCache()
    app = _app(cache)
    url = "s3://elsewhere/" + "B" * 2000
    status, doc, _ = post(app, orjson.dumps({"model_name": "m.onnx", "url": url}))
    assert status == 400 and "BBBB" not in doc["Message"] and "elsewhere" not in doc["Message"]
    assert f"a string of {len(url)} characters, not under the prefix" in doc["Message"]
    status, doc, _ = post(app, orjson.dumps({"model_name": "m.onnx", "url": ["x"]}))
    assert status == 400 and "url (a JSON list, not a string)" in doc["Message"]
    assert cache.preloaded == []
    status, doc, _ = post(app, orjson.dumps({"model_name": "m.onnx",
                                             "url": "s3://bucket/models/m.onnx"}))
    assert status == 200 and cache.preloaded == ["m.onnx"]
