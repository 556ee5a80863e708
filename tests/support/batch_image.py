"""A stand-in for a user's model image (the SageMaker container contract), for batch tests.

Run as a process: ``python -m tests.support.batch_image PORT LOG``. None of
kubeinfer's code runs in it: it is what a batch worker's ``model_url`` talks to.

    GET  /ping                 -> 200
    GET  /execution-parameters -> {"MaxConcurrentTransforms": 3,
                                   "BatchStrategy": "SINGLE_RECORD", "MaxPayloadInMB": 1}
    POST /invocations          -> one line per CSV line of the body: the sum of its
                                  values; 400 (SageMaker's error shape) when a value is
                                  not a number. Each request appends
                                  {"records": n, "in_flight": k} to LOG.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_lock = threading.Lock()
_in_flight = 0
PARAMETERS = {"MaxConcurrentTransforms": 3, "BatchStrategy": "SINGLE_RECORD",
              "MaxPayloadInMB": 1}


class Handler(BaseHTTPRequestHandler):
    log_path = ""

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _answer(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/ping":
            self._answer(200, b"{}")
        elif self.path == "/execution-parameters":
            self._answer(200, json.dumps(PARAMETERS).encode())
        else:
            self._answer(404, b"{}")

    def do_POST(self) -> None:
        global _in_flight
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        with _lock:
            _in_flight += 1
            in_flight = _in_flight
        try:
            time.sleep(0.05)  # long enough for requests to overlap
            lines = [line for line in body.decode().splitlines() if line.strip()]
            try:
                sums: list[float] | None = [sum(float(v) for v in line.split(","))
                                            for line in lines]
            except ValueError:
                sums = None
            else:
                with _lock, open(self.log_path, "a") as log:
                    log.write(json.dumps({"records": len(lines), "in_flight": in_flight})
                              + "\n")
        finally:
            # Before the answer is written: once the client has it, it may send the next
            # request at once, which must not find this one still counted.
            with _lock:
                _in_flight -= 1
        if sums is None:
            self._answer(400, b'{"ErrorCode": "ValidationError", '
                              b'"Message": "a value is not a number"}')
        else:
            self._answer(200, "".join(f"{s}\n" for s in sums).encode(), "text/csv")


def main() -> None:
    port, log = int(sys.argv[1]), sys.argv[2]
    Handler.log_path = log
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


if __name__ == "__main__":
    main()
