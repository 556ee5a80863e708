"""A real local webhook receiver for async notifications (a threaded HTTP server).

Records every POST body (JSON) in arrival order, with ``_at`` (time.monotonic()
when it arrived, for latency measurements). ``fail_first`` makes it answer
503 to that many POSTs first, to exercise the notifier's retries.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class WebhookReceiver:
    def __init__(self, fail_first: int = 0) -> None:
        self.received: list[dict[str, Any]] = []
        self.failed = 0
        self.fail_first = fail_first
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real receivers do

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                body = self.rfile.read(length)
                with receiver._lock:
                    refuse = receiver.failed < receiver.fail_first
                    if refuse:
                        receiver.failed += 1
                    else:
                        receiver.received.append({"path": self.path, "_at": time.monotonic(),
                                                  **json.loads(body)})
                self.send_response(503 if refuse else 200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.received)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
