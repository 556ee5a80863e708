"""S3's 503 SlowDown, from a real HTTP server, through the client ``s3_client`` builds.

AWS answers 503 SlowDown while a prefix scales up to a request rate, for seconds at a
time, to any request, POSTs included (CreateMultipartUpload, CompleteMultipartUpload).
SeaweedFS never does. The client must wait and retry rather than give up: a batch worker
that gives up exits and spends one of its pod's few retries.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest

from kubeinfer_runtime.batch.store import Store
from kubeinfer_runtime.contract import S3Settings

#: Each request (method and URL) is refused this often before it is served.
SLOWDOWNS = 5
_SLOW = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
         b"<Message>Please reduce your request rate.</Message></Error>")


class _Throttling(BaseHTTPRequestHandler):
    seen: dict[tuple[str, str], int] = {}
    objects: dict[str, bytes] = {}
    parts: dict[str, bytes] = {}

    def log_message(self, *_: object) -> None:
        pass

    def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None
               ) -> None:
        self.send_response(status)
        if body.startswith(b"<"):
            self.send_header("Content-Type", "application/xml")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _throttled(self) -> bool:
        length = int(self.headers.get("Content-Length") or 0)
        self.body = self.rfile.read(length) if length else b""
        key = (self.command, self.path)
        self.seen[key] = self.seen.get(key, 0) + 1
        if self.seen[key] <= SLOWDOWNS:
            self._reply(503, _SLOW)
            return True
        return False

    def do_PUT(self) -> None:
        if self._throttled():
            return
        url = urlsplit(self.path)
        if "partNumber" in url.query:
            self.parts[url.query] = self.body
        else:
            self.objects[url.path] = self.body
        self._reply(200, headers={"ETag": '"e"'})

    def do_POST(self) -> None:
        if self._throttled():
            return
        url = urlsplit(self.path)
        if url.query == "uploads=":
            self._reply(200, b"<InitiateMultipartUploadResult><Bucket>bkt</Bucket><Key>k"
                        b"</Key><UploadId>u1</UploadId></InitiateMultipartUploadResult>")
            return
        self.objects[url.path] = b"".join(v for _, v in sorted(self.parts.items()))
        self._reply(200, b"<CompleteMultipartUploadResult><Bucket>bkt</Bucket><Key>k</Key>"
                    b'<ETag>"e-2"</ETag></CompleteMultipartUploadResult>')


@pytest.fixture
def endpoint() -> Iterator[str]:
    _Throttling.seen, _Throttling.objects, _Throttling.parts = {}, {}, {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Throttling)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_slowdown_is_waited_out(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    store = Store(S3Settings(endpoint_url=endpoint, access_key="k", secret_key="s",
                             region="us-east-1"))
    data = b"x" * (6 << 20)  # multipart: POST, PUT, PUT, POST, each throttled first
    store.write("s3://bkt/out/a.out", io.BytesIO(data), len(data))
    assert _Throttling.objects["/bkt/out/a.out"] == data
    # Backed off for seconds per request, not ~1 s: SlowDown asks for a lower rate.
    assert sum(slept) >= 4 * 5.0
