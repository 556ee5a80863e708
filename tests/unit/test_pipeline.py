"""Multi-container pipelines: the runner, handler steps, model steps, in-process.

Real steps throughout: the example handlers (examples/handlers/iris_steps.py)
and the iris model loaded by onnxruntime. Image steps need another process and
are covered in tests/integration/test_multicontainer.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from kubeinfer_runtime.contract import (
    InferenceExecution,
    ModelServerSettings,
    PipelineSpec,
    PipelineStep,
)
from kubeinfer_runtime.errors import ModelError, NotReady, RuntimeServiceError, ValidationError
from kubeinfer_runtime.metrics import ModelServerMetrics
from kubeinfer_runtime.pipeline.handlers import (
    HandlerImportError,
    call_handler,
    import_handler,
    parse_handler,
)
from kubeinfer_runtime.pipeline.runner import Pipeline
from kubeinfer_runtime.pipeline.steps import Step, build_steps

REPO = Path(__file__).resolve().parents[2]
HANDLERS = f"file://{REPO}/examples/handlers"
FLOWERS = {"flowers": [
    {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2},
    {"sepal_length": 6.7, "sepal_width": 3.0, "petal_length": 5.2, "petal_width": 2.3},
]}


def _pipeline(models_dir: Path, execution: InferenceExecution,
              pool: ThreadPoolExecutor) -> Pipeline:
    spec = PipelineSpec(execution=execution, steps=[
        PipelineStep(name="pre", handler="iris_steps:preprocess", code_dir=HANDLERS),
        PipelineStep(name="iris", model_uri=f"file://{models_dir / 'iris.onnx'}"),
        PipelineStep(name="post", handler="iris_steps:postprocess", code_dir=HANDLERS),
    ])
    settings = ModelServerSettings(pipeline=spec, endpoint_name="ep", variant_name="v")
    steps = build_steps(settings, {s.name: ModelServerMetrics("ep", "v", s.name)
                                   for s in spec.steps}, pool)
    pipeline = Pipeline(steps, execution)
    for step in steps:
        step.start()
    deadline = time.monotonic() + 30
    while pipeline.not_ready() is not None:
        assert time.monotonic() < deadline, pipeline.not_ready()
        time.sleep(0.02)
    return pipeline


@pytest.fixture(scope="module")
def pool() -> Any:
    with ThreadPoolExecutor(2) as p:
        yield p


@pytest.fixture(scope="module")
def serial(models_dir: Path, pool: ThreadPoolExecutor) -> Pipeline:
    return _pipeline(models_dir, InferenceExecution.SERIAL, pool)


@pytest.fixture(scope="module")
def direct(models_dir: Path, pool: ThreadPoolExecutor) -> Pipeline:
    return _pipeline(models_dir, InferenceExecution.DIRECT, pool)


def run(pipeline: Pipeline, body: Any, content_type: str | None = "application/json",
        accept: str | None = None, target: str | None = None) -> tuple[bytes, str]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return asyncio.run(pipeline.run(raw, content_type, accept, target))


def test_serial_pre_model_post(serial: Pipeline) -> None:
    body, content_type = run(serial, FLOWERS)
    assert content_type == "application/json"
    results = json.loads(body)["results"]
    assert [r["species"] for r in results] == ["setosa", "virginica"]
    assert all(0.5 < r["confidence"] <= 1 for r in results)


def test_serial_error_names_the_step(serial: Pipeline) -> None:
    with pytest.raises(ModelError) as info:
        run(serial, {"flowers": [{"sepal_length": 1}]})
    msg = info.value.message
    assert info.value.status == 424
    assert msg.startswith('Step 1 of 3 ("pre") failed with 400 ValidationError')
    assert "lacks sepal_width, petal_length, petal_width" in msg


def test_serial_error_at_the_model_step(models_dir: Path, pool: ThreadPoolExecutor) -> None:
    # The model step gets what the client sent (no preprocessing): rows of 2 features.
    spec = PipelineSpec(steps=[
        PipelineStep(name="iris", model_uri=f"file://{models_dir / 'iris.onnx'}"),
        PipelineStep(name="post", handler="iris_steps:postprocess", code_dir=HANDLERS)])
    settings = ModelServerSettings(pipeline=spec)
    steps = build_steps(settings, {s.name: ModelServerMetrics("", "", s.name)
                                   for s in spec.steps}, pool)
    pipeline = Pipeline(steps, InferenceExecution.SERIAL)
    with pytest.raises(NotReady):  # not started yet: 503, not a step failure
        run(pipeline, [[1, 2]])
    for step in steps:
        step.start()
    while pipeline.not_ready():
        time.sleep(0.02)
    with pytest.raises(ModelError) as info:
        run(pipeline, [[1, 2]])
    assert info.value.message.startswith('Step 1 of 2 ("iris") failed with 400')
    assert 'Input "X"' in info.value.message


def test_accept_applies_to_the_last_step_only(direct: Pipeline, serial: Pipeline) -> None:
    body, content_type = run(direct, [[5.1, 3.5, 1.4, 0.2]], accept="text/csv", target="iris")
    assert content_type == "text/csv" and body.strip() == b"0"


def test_direct_invokes_one_step(direct: Pipeline) -> None:
    body, _ = run(direct, FLOWERS, target="pre")
    assert json.loads(body) == [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]
    body, _ = run(direct, [[5.1, 3.5, 1.4, 0.2]], target="iris")
    assert json.loads(body)["predictions"]["label"] == [0]


@pytest.mark.parametrize("target", [None, "", "nope"])
def test_direct_needs_a_known_target(direct: Pipeline, target: str | None) -> None:
    with pytest.raises(ValidationError) as info:
        run(direct, FLOWERS, target=target)
    assert info.value.status == 400
    assert "TargetContainerHostname= to one of pre, iris, post" in info.value.message


def test_handler_refs_and_imports() -> None:
    assert parse_handler("a.b:c") == ("a.b", "c")
    for bad in ("nocolon", ":f", "m:", "m:f-g", "1m:f"):
        with pytest.raises(HandlerImportError, match="must look like module:function"):
            parse_handler(bad)
    with pytest.raises(HandlerImportError, match="module 'no_such_mod' cannot be imported"):
        import_handler("no_such_mod:f")
    with pytest.raises(HandlerImportError, match="has no callable 'nothing'"):
        import_handler("iris_steps:nothing", str(REPO / "examples" / "handlers"))


def test_handler_contract_is_checked() -> None:
    with pytest.raises(TypeError, match="not \\(bytes, content_type\\)"):
        call_handler(lambda b, c: b, "m:f", b"x", None)  # type: ignore[arg-type,return-value]
    assert call_handler(lambda b, c: (bytearray(b), "a/b"), "m:f", b"x", None) == (b"x", "a/b")


def test_unimportable_handler_keeps_the_pipeline_not_ready(pool: ThreadPoolExecutor) -> None:
    spec = PipelineSpec(steps=[PipelineStep(name="pre", handler="missing_mod:f")])
    steps: list[Step] = build_steps(ModelServerSettings(pipeline=spec), {}, pool)
    pipeline = Pipeline(steps, InferenceExecution.SERIAL)
    steps[0].start()
    deadline = time.monotonic() + 10
    while "is still being imported" in (pipeline.not_ready() or ""):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    reason = pipeline.not_ready()
    assert reason is not None and reason.startswith('Step 1 ("pre") is not ready: Handler')
    assert "missing_mod" in reason
    # The words local mode gives a rollout up on at once (not at --timeout).
    assert "Handler 'missing_mod:f' failed to load: module 'missing_mod' cannot be " \
        "imported" in reason
    with pytest.raises(RuntimeServiceError) as info:
        run(pipeline, b"{}")
    assert info.value.status == 503


def test_pipeline_spec_refuses_ambiguous_steps() -> None:
    with pytest.raises(ValueError, match="exactly one of model_uri, handler, url"):
        PipelineSpec(steps=[PipelineStep(name="a", handler="m:f", url="http://x")])
    with pytest.raises(ValueError, match="duplicate step names: a"):
        PipelineSpec(steps=[PipelineStep(name="a", handler="m:f"),
                            PipelineStep(name="a", handler="m:g")])
