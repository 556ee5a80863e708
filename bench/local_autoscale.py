"""The local-mode auto scaling rig shared by ``bench/autoscale.py`` and the autoscale tests.

The bench and ``tests/integration/test_autoscale*.py`` drive the same kind of
endpoint the same way: one variant, ``main``, serving an iris model with an
``autoscaling`` policy, fed by keep-alive clients at a rate that changes in
steps, and judged by the ``Scaled ...`` events the supervisor records. It lives
here rather than in ``tests/support`` because tests may import the bench but
the bench must not depend on the tests.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import yaml

#: The scaled variant of every endpoint built by ``autoscaled_endpoint``.
VARIANT = "main"
#: One iris row: the request every load client sends.
BODY = json.dumps({"instances": [[5.1, 3.5, 1.4, 0.2]]})


def autoscaled_endpoint(name: str, model: Path | str, autoscaling: dict[str, Any]) -> str:
    """The YAML of Endpoint ``name``: one variant, ``main``, serving the ONNX file ``model``
    and scaled by ``autoscaling`` (the variant's ``autoscaling`` field, as data)."""
    manifest = {
        "apiVersion": "kubeinfer.io/v1alpha1",
        "kind": "Endpoint",
        "metadata": {"name": name},
        "spec": {"variants": [{"name": VARIANT, "model": {"uri": f"file://{model}"},
                               "autoscaling": autoscaling}]},
    }
    return yaml.safe_dump(manifest, sort_keys=False)


def scale_events(home: Path, endpoint: str) -> list[tuple[float, str]]:
    """(wall-clock time, message) of each replica change local mode recorded for ``endpoint``
    under the KUBEINFER_HOME ``home``, oldest first."""
    path = home / "local" / endpoint / "events.jsonl"
    docs = [json.loads(line) for line in path.read_text().splitlines()]
    return [(d["time"], d["message"]) for d in docs if "Scaled " in d["message"]]


class StepLoad:
    """Invocations of one endpoint at a total rate that can change while it runs.

    ``clients`` threads each POST ``BODY`` over a keep-alive connection at
    ``rate / clients`` requests per second, started ``1 / rate`` apart, so one
    slow response on a loaded machine does not lower the total rate the
    scaling policy sees. A rate of 0 pauses the load. Use it as a context
    manager: leaving it stops and joins every client.
    """

    def __init__(self, url: str, endpoint: str, *, rate: float = 0.0, clients: int = 1) -> None:
        #: Total requests per second; set it to step the load.
        self.rate = rate
        self._target = f"{url}/endpoints/{endpoint}/invocations"
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(clients, i))
                         for i in range(clients)]

    def __enter__(self) -> StepLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _client(self, clients: int, index: int) -> None:
        # Staggered starts: clients starting together would send a burst that a
        # policy's first, still short, metrics window reads as a much higher rate.
        if self.rate > 0:
            self._stop.wait(index / self.rate)
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                rate = self.rate  # read once: the driver may change it meanwhile
                if rate <= 0:
                    time.sleep(0.05)
                    continue
                started = time.monotonic()
                client.post(self._target, content=BODY,
                            headers={"Content-Type": "application/json"})
                time.sleep(max(0.0, clients / rate - (time.monotonic() - started)))
