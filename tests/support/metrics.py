"""Reading a runtime process's Prometheus text in tests: one metric's series summed."""

from __future__ import annotations

import httpx


def metric(url: str, name: str, **labels: str) -> float:
    """The sum of ``name``'s labelled series at ``url``/metrics whose labels include
    ``labels`` (0 while there are none)."""
    text = httpx.get(url + "/metrics", timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total
