"""The model call of a batch worker: in-process, an in-process pipeline, or an image.

* ``model_uri``: loaded through the model server's own procedure
  (``server.state.load_into``: fetch, load, warm-up) and called in-process —
  decode, predict, encode, as ``/invocations`` does (``codec``), with no HTTP hop.
  Calls are blocking and thread-safe: the worker runs ``max_concurrent_transforms``
  of them at once in threads (onnxruntime releases the GIL while it predicts).
* ``pipeline``: the multi-container steps, in-process (``pipeline.runner``), on an
  event loop of their own.
* ``model_url``: an image speaking the SageMaker container contract on localhost:
  ``GET /ping`` until 200 (at most ``startup_timeout_s``), ``GET
  /execution-parameters`` (its MaxConcurrentTransforms, BatchStrategy and
  MaxPayloadInMB apply where the job set none, as on SageMaker; MaxPayloadInMB 0
  only with splitType None, as the spec allows), then ``POST
  /invocations``. A 5xx, a timeout or a dropped connection is retried
  ``invocation_retries`` times with backoff; a 4xx is an answer about the records.

A model that cannot load raises ``ModelUnavailable`` at once (the worker exits
``EXIT_MODEL_FAILED``): no minutes of retries.

Line records in JSON (``application/json``, JSON Lines) are one instance each: an
in-process model gets a request of several lines as ``{"instances": [...]}``, and
answers ``Accept: application/jsonlines`` with one line per record. Images get the
records as they are, with the job's content type.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from kubeinfer_runtime import codec
from kubeinfer_runtime.batch.errors import BadRecord, ModelUnavailable, short
from kubeinfer_runtime.codec import Encoding
from kubeinfer_runtime.codec_tensors import load_json
from kubeinfer_runtime.contract.batch import (
    BatchSettings,
    BatchStrategy,
    SplitType,
    media_type_of,
)
from kubeinfer_runtime.errors import NotReady, RuntimeServiceError, ValidationError
from kubeinfer_runtime.metrics import ModelServerMetrics
from kubeinfer_runtime.models.base import Tensors
from kubeinfer_runtime.wire import CONTAINER_KEEPALIVE_S

if TYPE_CHECKING:
    import httpx

log = logging.getLogger("kubeinfer.batch")

#: Content types whose Line records are JSON documents.
JSON_LINES_TYPES = frozenset({"application/json", "application/jsonlines", "application/jsonl",
                              "application/x-jsonlines", "application/x-ndjson"})
_JSONL_ACCEPT = JSON_LINES_TYPES - {"application/json"}
#: Largest body an in-process decode accepts when MaxPayloadInMB is 0 (no bound).
UNBOUNDED_PAYLOAD_BYTES = 1 << 30


@dataclass(frozen=True)
class Answer:
    body: bytes
    content_type: str


def is_bad_request(error: BaseException) -> bool:
    """Whether a failed call says something about the records it carried (a 4xx other
    than 429): the worker then tries them apart instead of retrying."""
    return (isinstance(error, RuntimeServiceError) and 400 <= error.status < 500
            and error.status != 429)


@dataclass(frozen=True)
class ExecutionParameters:
    """An image's ``GET /execution-parameters`` answer (None: it did not say)."""

    max_concurrent_transforms: int | None = None
    batch_strategy: BatchStrategy | None = None
    max_payload_mb: int | None = None

    @classmethod
    def parse(cls, doc: Any) -> ExecutionParameters:
        if not isinstance(doc, dict):
            return cls()
        mct, strategy, mb = (doc.get("MaxConcurrentTransforms"), doc.get("BatchStrategy"),
                             doc.get("MaxPayloadInMB"))
        strategies = {"MULTIRECORD": BatchStrategy.MULTI_RECORD,
                      "SINGLERECORD": BatchStrategy.SINGLE_RECORD}
        return cls(
            mct if isinstance(mct, int) and 1 <= mct <= 1024 else None,
            strategies.get(str(strategy).upper().replace("_", "")) if strategy else None,
            mb if isinstance(mb, int) and 0 <= mb <= 100 else None)

    def apply(self, settings: BatchSettings) -> BatchSettings:
        """``settings`` with these parameters where the job set none (SageMaker's rule)."""
        update: dict[str, Any] = {}
        if settings.max_concurrent_transforms is None and self.max_concurrent_transforms:
            update["max_concurrent_transforms"] = self.max_concurrent_transforms
        if settings.batch_strategy is None and self.batch_strategy is not None:
            update["batch_strategy"] = self.batch_strategy
        mb = self.max_payload_mb
        # 0 (whole objects, unbounded) only where objects are not split: the spec
        # refuses it with a splitType, and an image may not choose it for a job either.
        if mb == 0 and settings.split_type is not SplitType.NONE:
            mb = None
        if settings.max_batch_payload_bytes is None and mb is not None:
            update["max_batch_payload_bytes"] = mb * 1024 * 1024
        return settings.model_copy(update=update) if update else settings


class Model(ABC):
    """One job's model, whichever kind."""

    #: What the model said about batching (images only).
    parameters = ExecutionParameters()
    #: Small requests are called on the worker's own thread, not handed to a thread:
    #: the hand-off costs more than a fast in-process model (the model server's
    #: inline rule, ``server.state.INLINE_THRESHOLD_S``).
    inline = False

    @abstractmethod
    def start(self) -> None:
        """Get ready (blocking, at most ``startup_timeout_s``); ModelUnavailable when it
        never will."""

    @abstractmethod
    def invoke(self, body: bytes, *, lines: bool) -> Answer:
        """One request (``lines``: the body is Line records); raises RuntimeServiceError."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the model holds."""


def make_model(settings: BatchSettings) -> Model:
    if settings.model_url is not None:
        return ImageModel(settings)
    if settings.pipeline is not None:
        return PipelineModel(settings)
    return InProcessModel(settings)


def _limits(settings: BatchSettings) -> codec.DecodeLimits:
    payload = settings.effective_max_payload_bytes or UNBOUNDED_PAYLOAD_BYTES
    return codec.DecodeLimits.for_settings(max(payload, settings.max_payload_bytes),
                                           settings.max_decoded_bytes)


def as_instances(body: bytes) -> bytes:
    """Line records of JSON, as one ``{"instances": [...]}`` request: one instance per
    record, exactly as ``records`` counts them (a blank line, empty or a lone ``\\r``,
    is no record; a line of spaces is one, and not JSON).

    Each line must be one JSON value, else :class:`BadRecord` names it (its number in
    the request, never its bytes): joined unchecked, ``[1,2],[3,4]`` would be two
    instances, and ``[1,2]],"extra":[[0]`` would add to the request's structure.
    Checked lines are joined as they are: a JSON value is self-delimiting, so the
    array holds exactly those values (re-encoding them would cost twice as much).
    """
    lines = [line for line in body.split(b"\n") if line not in (b"", b"\r")]
    loads = orjson.loads
    for number, line in enumerate(lines, 1):
        try:
            loads(line)
        except orjson.JSONDecodeError as e:
            # NaN and Infinity, as Python's json writes them, are one JSON value to the
            # model server's codec too (``load_json``): kept as written.
            if b"N" in line or b"I" in line:
                try:
                    load_json(line)
                    continue
                except ValidationError:
                    pass
            why = ("is blank (whitespace only)" if not line.strip() else
                   f"is not one JSON value (invalid at character {e.pos} of its line)")
            raise BadRecord(f"JSON Lines record {number} of the request {why}: send one "
                            "JSON document per line") from None
    return b'{"instances":[' + b",".join(lines) + b"]}"


def encode_jsonlines(outputs: Tensors, output: str | None) -> bytes:
    """One JSON line per record: the chosen (or only) output's rows, else
    ``{"<output>": row, ...}`` per record."""
    if output is not None or len(outputs) == 1:
        arr = outputs[output] if output is not None else next(iter(outputs.values()))
        if arr.ndim == 0:
            return codec.dumps(arr) + b"\n"
        return b"".join(codec.dumps(row) + b"\n" for row in arr)
    n = min(len(a) for a in outputs.values())
    return b"".join(codec.dumps({k: v[i] for k, v in outputs.items()}) + b"\n"
                    for i in range(n))


class InProcessModel(Model):
    """A ``model_uri`` model, loaded and called in this process."""

    def __init__(self, settings: BatchSettings) -> None:
        from kubeinfer_runtime.server.state import ModelSlot

        self.settings = settings
        self.slot = ModelSlot(settings.model_name, settings.model_uri)
        self.limits = _limits(settings)
        self.media = media_type_of(settings.input_content_type)
        accept = media_type_of(settings.accept)
        self.jsonl_out = accept in _JSONL_ACCEPT
        try:
            self.encoding = Encoding.JSON if self.jsonl_out else codec.negotiate(settings.accept)
        except ValidationError as e:
            raise ModelUnavailable(f"output.accept: {e.message}") from None
        self.out_type = ("application/jsonlines" if self.jsonl_out
                         else self.encoding.content_type.decode())
        self.output: str | None = None

    def start(self) -> None:
        from kubeinfer_runtime.server.state import start_loading

        metrics = ModelServerMetrics(self.settings.job, "batch", self.settings.model_name)
        thread = start_loading(self.slot, self.settings, metrics)
        thread.join(self.settings.startup_timeout_s)
        model = self.slot.model
        if model is None:
            raise ModelUnavailable(self.slot.reason if self.slot.failed else
                                   f'Model "{self.settings.model_name}" did not load within '
                                   f"startupTimeout ({self.settings.startup_timeout_s:.0f} s)")
        if self.jsonl_out or self.encoding.one_output:
            self.output = codec.chosen_output(None, model.meta.outputs)
        self.inline = model.inline

    def invoke(self, body: bytes, *, lines: bool) -> Answer:
        model = self.slot.get()
        content_type = self.settings.input_content_type
        if lines and self.media in JSON_LINES_TYPES:
            body, content_type = as_instances(body), "application/json"
        inputs = codec.decode_request(body, content_type, model.meta.inputs, self.limits)
        outputs = model.backend.predict(inputs, None if self.output is None else (self.output,))
        if self.jsonl_out:
            return Answer(encode_jsonlines(outputs, self.output), self.out_type)
        return Answer(codec.encode_response(outputs, self.encoding, self.output), self.out_type)

    def close(self) -> None:
        model = self.slot.unload()
        if model is not None:
            model.backend.unload()


class PipelineModel(Model):
    """A multi-container (``pipeline``) model, its steps in-process."""

    def __init__(self, settings: BatchSettings) -> None:
        from kubeinfer_runtime.pipeline.runner import Pipeline
        from kubeinfer_runtime.pipeline.steps import build_steps

        assert settings.pipeline is not None
        self.settings = settings
        self.pool = ThreadPoolExecutor(settings.effective_max_concurrent_transforms,
                                       thread_name_prefix="pipeline")
        metrics = {s.name: ModelServerMetrics(settings.job, "batch", s.name)
                   for s in settings.pipeline.steps}
        self.steps = build_steps(settings, metrics, self.pool)
        self.pipeline = Pipeline(self.steps, settings.pipeline.execution)
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="pipeline-loop", daemon=True).start()

    def _run(self, coro: Any, timeout: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> None:
        from kubeinfer_runtime.pipeline.steps import UrlStep
        from kubeinfer_runtime.server.state import LOAD_FAILED_MARKER

        for step in self.steps:
            step.start()
        deadline = time.monotonic() + self.settings.startup_timeout_s
        while True:
            for step in self.steps:
                if isinstance(step, UrlStep):
                    self._run(step.check(), 10.0)
            reason = self.pipeline.not_ready()
            if reason is None:
                return
            if LOAD_FAILED_MARKER in reason or time.monotonic() > deadline:
                raise ModelUnavailable(reason)
            time.sleep(0.05)

    def invoke(self, body: bytes, *, lines: bool) -> Answer:
        payload, content_type = self._run(
            self.pipeline.run(body, self.settings.input_content_type,
                              self.settings.accept or None, None),
            self.settings.invocation_timeout_s)
        return Answer(payload, content_type)

    def close(self) -> None:
        for step in self.steps:
            self._run(step.close(), 10.0)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.pool.shutdown(wait=False, cancel_futures=True)


class ImageModel(Model):
    """An image speaking the SageMaker container contract at ``model_url``."""

    def __init__(self, settings: BatchSettings) -> None:
        import httpx  # here: a job of a model in process never needs it (0.1 s of imports)

        assert settings.model_url is not None
        self.settings = settings
        self.url = settings.model_url.rstrip("/")
        self.client = httpx.Client(
            timeout=httpx.Timeout(settings.invocation_timeout_s, connect=5.0),
            # Idle connections closed before the container closes them (CONTAINER_KEEPALIVE_S):
            # a request on a closing one costs a retry, or fails a job without retries.
            limits=httpx.Limits(max_connections=1024, max_keepalive_connections=64,
                                keepalive_expiry=CONTAINER_KEEPALIVE_S),
            # The model container is beside the worker: never through an env proxy.
            trust_env=False)
        self.headers = {"content-type": settings.input_content_type or
                        "application/octet-stream"}
        if settings.accept:
            self.headers["accept"] = settings.accept

    def start(self) -> None:
        import httpx

        deadline = time.monotonic() + self.settings.startup_timeout_s
        last = "it did not answer"
        while True:
            try:
                r = self.client.get(self.url + "/ping", timeout=2.0)
                if r.status_code == 200:
                    break
                last = f"it answered {r.status_code}"
            except httpx.HTTPError as e:
                last = f"it is unreachable ({type(e).__name__})"
            if time.monotonic() > deadline:
                raise ModelUnavailable(
                    f"Model container {self.url} did not answer GET /ping with 200 within "
                    f"startupTimeout ({self.settings.startup_timeout_s:.0f} s): {last}; check "
                    "the image starts and listens there")
            time.sleep(0.1)
        try:
            r = self.client.get(self.url + "/execution-parameters", timeout=5.0)
            if r.status_code == 200:
                self.parameters = ExecutionParameters.parse(orjson.loads(r.content))
                log.info("Model container %s execution parameters: %s", self.url,
                         self.parameters)
        except (httpx.HTTPError, orjson.JSONDecodeError):
            pass  # optional in the contract: the job's settings (or defaults) apply

    def invoke(self, body: bytes, *, lines: bool) -> Answer:
        import httpx

        attempts = self.settings.invocation_retries + 1
        for attempt in range(1, attempts + 1):
            try:
                r = self.client.post(self.url + "/invocations", content=body,
                                     headers=self.headers)
            except httpx.HTTPError as e:
                error: RuntimeServiceError = NotReady(
                    f"Model container {self.url} did not answer ({type(e).__name__}) after "
                    f"{attempt} attempt(s)")
            else:
                if r.status_code < 400:
                    return Answer(r.content, r.headers.get("content-type", ""))
                error = _http_error(self.url, r)
                if is_bad_request(error):
                    raise error
            if attempt < attempts:
                time.sleep(min(0.2 * 2 ** (attempt - 1), 5.0))
        raise error

    def close(self) -> None:
        self.client.close()


def _http_error(url: str, r: httpx.Response) -> RuntimeServiceError:
    """The container's error, kept short; its text is the container's, not the record's."""
    message = ""
    try:
        doc = orjson.loads(r.content)
        if isinstance(doc, dict):
            message = str(doc.get("Message") or doc.get("message") or doc.get("error") or "")
    except orjson.JSONDecodeError:
        pass
    text = f"Model container {url} answered {r.status_code}" + (
        f": {short(message, 300)}" if message else "")
    if 400 <= r.status_code < 500 and r.status_code != 429:
        return ValidationError(text, status=r.status_code)
    return NotReady(text)
