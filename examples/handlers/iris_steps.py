"""Pre- and post-processing steps for the iris serial pipeline (examples/serial-pipeline.yaml).

Handler steps implement the kubeinfer handler contract (see
``kubeinfer_runtime.pipeline.handlers``)::

    def handler(body: bytes, content_type: str | None) -> tuple[bytes, str]

``preprocess`` turns named flower measurements into the model's [N, 4] rows;
``postprocess`` turns the model's labels and probabilities into species names
with a confidence. Raising ValueError marks the input as bad.
"""

from __future__ import annotations

import json
from typing import Any

FEATURES = ("sepal_length", "sepal_width", "petal_length", "petal_width")
SPECIES = ("setosa", "versicolor", "virginica")


def preprocess(body: bytes, content_type: str | None) -> tuple[bytes, str]:
    """``{"flowers": [{"sepal_length": 5.1, ...}, ...]}`` → ``[[5.1, 3.5, 1.4, 0.2], ...]``."""
    if content_type is not None and not content_type.startswith("application/json"):
        raise ValueError(f"send application/json, not {content_type}")
    doc: Any = json.loads(body)
    flowers = doc.get("flowers") if isinstance(doc, dict) else None
    if not isinstance(flowers, list) or not flowers:
        raise ValueError('expected {"flowers": [{"sepal_length": ..., ...}, ...]}')
    rows = []
    for i, flower in enumerate(flowers):
        missing = [f for f in FEATURES if f not in flower]
        if missing:
            raise ValueError(f"flowers[{i}] lacks {', '.join(missing)}")
        rows.append([float(flower[f]) for f in FEATURES])
    return json.dumps(rows).encode(), "application/json"


def postprocess(body: bytes, content_type: str | None) -> tuple[bytes, str]:
    """``{"predictions": {"label": [...], "probabilities": [...]}}`` → species and confidence."""
    preds = json.loads(body)["predictions"]
    results = [
        {"species": SPECIES[label], "confidence": round(max(probs), 4)}
        for label, probs in zip(preds["label"], preds["probabilities"], strict=True)
    ]
    return json.dumps({"results": results}).encode(), "application/json"
