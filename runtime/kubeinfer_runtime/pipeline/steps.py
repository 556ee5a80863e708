"""The three kinds of pipeline step behind one interface: model, handler, container URL.

Each step takes a body and its Content-Type and answers a body and a
Content-Type, like a SageMaker container's ``/invocations``. Steps get ready
in the background (a model loads and answers a warm-up inference, a handler
imports) and say why they are not ready, so ``/ping`` can report the step that
holds the variant back. A step that can never get ready (a model that fails to
load or to warm up, a handler that cannot be imported) says so at once, with
the load-failed words the local supervisor gives a rollout up on.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor

import httpx
import orjson

from kubeinfer_runtime import codec
from kubeinfer_runtime.contract import ModelServerSettings, PipelineStep
from kubeinfer_runtime.errors import ModelError, NotReady, RuntimeServiceError, ValidationError
from kubeinfer_runtime.metrics import ModelServerMetrics
from kubeinfer_runtime.pipeline.handlers import (
    Handler,
    HandlerImportError,
    call_handler,
    import_handler,
)
from kubeinfer_runtime.server.hotpath import invocations_work
from kubeinfer_runtime.server.state import (
    LOAD_FAILED_MARKER,
    ModelSlot,
    decode_limits,
    start_loading,
)
from kubeinfer_runtime.storage.uri import FileLocation, parse_model_uri
from kubeinfer_runtime.wire import CONTAINER_KEEPALIVE_S

Result = tuple[bytes, str]

log = logging.getLogger("kubeinfer.server")


class Step(ABC):
    def __init__(self, spec: PipelineStep) -> None:
        self.spec = spec
        self.name = spec.name

    def start(self) -> None:  # noqa: B027 - optional hook, most steps need nothing
        """Begin getting ready (in the background); default: ready at once."""

    @abstractmethod
    def not_ready(self) -> str | None:
        """Why the step cannot serve yet, or None when it can."""

    @abstractmethod
    async def invoke(self, body: bytes, content_type: str | None,
                     accept: str | None) -> Result:
        """Run the step; raise a ``RuntimeServiceError`` (or anything) when it fails."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the step holds (models, connections)."""


class ModelStep(Step):
    """A model served in-process, exactly like a single-model variant."""

    def __init__(self, spec: PipelineStep, settings: ModelServerSettings,
                 metrics: ModelServerMetrics, pool: ThreadPoolExecutor) -> None:
        super().__init__(spec)
        assert spec.model_uri is not None
        self.settings = settings.model_copy(update={
            "model_uri": spec.model_uri, "model_format": spec.model_format,
            "model_name": spec.name, "pipeline": None})
        self.metrics = metrics
        self.pool = pool
        self.limits = decode_limits(settings)
        self.slot = ModelSlot(spec.name, spec.model_uri)

    def start(self) -> None:
        start_loading(self.slot, self.settings, self.metrics)

    def not_ready(self) -> str | None:
        return None if self.slot.model is not None else self.slot.reason

    async def invoke(self, body: bytes, content_type: str | None,
                     accept: str | None) -> Result:
        model = self.slot.get()
        encoding = codec.negotiate(accept)
        if model.inline:
            payload, _ = invocations_work(model, body, content_type, encoding, self.limits)
        else:
            payload, _ = await asyncio.get_running_loop().run_in_executor(
                self.pool, invocations_work, model, body, content_type, encoding, self.limits)
        return payload, encoding.content_type.decode()

    async def close(self) -> None:
        model = self.slot.unload()
        if model is not None:
            model.backend.unload()


class HandlerStep(Step):
    """A Python function (``module:function``), see ``pipeline.handlers``."""

    def __init__(self, spec: PipelineStep, pool: ThreadPoolExecutor,
                 base_dir: str = "/") -> None:
        super().__init__(spec)
        assert spec.handler is not None
        self.ref = spec.handler
        self.pool = pool
        # file://relative/dir resolves like a relative model URI (the image's
        # KUBEINFER_MODEL_BASE_DIR); a plain path is used as is.
        code = spec.code_dir
        if code is not None and code.startswith("file://"):
            loc = parse_model_uri(code, base_dir)
            assert isinstance(loc, FileLocation)  # a file:// URI
            code = loc.path
        self.code_dir = code
        self.fn: Handler | None = None
        self.reason = f"Handler {self.ref} is still being imported"

    def start(self) -> None:
        # Importing user code may be slow (it may load its own data): a thread.
        threading.Thread(target=self._import, name=f"import-{self.name}", daemon=True).start()

    def _import(self) -> None:
        # Any failure is final and reported at once (with the load-failed
        # words), so local mode gives up a rollout now rather than at --timeout.
        try:
            self.fn = import_handler(self.ref, self.code_dir)
        except HandlerImportError as e:
            self.reason = str(e)
        except BaseException as e:  # a bug of ours: still say so, never hang "importing"
            self.reason = f"Handler {self.ref!r} {LOAD_FAILED_MARKER}: {type(e).__name__}: {e}"
        if self.fn is None:
            log.error("Pipeline step %s: %s", self.name, self.reason)

    def not_ready(self) -> str | None:
        return None if self.fn is not None else self.reason

    async def invoke(self, body: bytes, content_type: str | None,
                     accept: str | None) -> Result:
        fn = self.fn
        if fn is None:
            raise NotReady(self.reason)
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self.pool, call_handler, fn, self.ref, body, content_type)
        except ValueError as e:
            raise ValidationError(f"Handler {self.ref} refused the input: {e}") from None
        except Exception as e:
            raise ModelError(f"Handler {self.ref} failed: {type(e).__name__}: {e}") from None


class UrlStep(Step):
    """A container in the same pod speaking the SageMaker contract on its own port."""

    def __init__(self, spec: PipelineStep, timeout_s: float = 60.0) -> None:
        super().__init__(spec)
        assert spec.url is not None
        self.url = spec.url.rstrip("/")
        # httpx keeps idle connections 5 s, as long as uvicorn's keep-alive and longer than
        # gunicorn's, and the kubelet asks /ping (which checks this step) every 5 s: a
        # request could go out on a connection the container was closing at that moment.
        # trust_env off: an HTTP(S)_PROXY in the pod's env (often set for every pod of a
        # cluster) would send the caller's data for a container beside it to the proxy.
        self.client = httpx.AsyncClient(
            timeout=timeout_s, limits=httpx.Limits(keepalive_expiry=CONTAINER_KEEPALIVE_S),
            trust_env=False)
        self.ready = False
        self.reason = f"Container {self.url} has not answered /ping yet"

    def not_ready(self) -> str | None:
        return None if self.ready else self.reason

    async def check(self) -> None:
        try:
            r = await self.client.get(self.url + "/ping", timeout=2.0)
            self.ready = r.status_code == 200
            self.reason = f"Container {self.url} answers /ping with {r.status_code}"
        except httpx.HTTPError as e:
            self.ready = False
            self.reason = f"Container {self.url} is unreachable ({type(e).__name__})"

    async def invoke(self, body: bytes, content_type: str | None,
                     accept: str | None) -> Result:
        headers = {"content-type": content_type or "application/octet-stream"}
        if accept:
            headers["accept"] = accept
        try:
            r = await self.client.post(self.url + "/invocations", content=body, headers=headers)
        except httpx.HTTPError as e:
            raise ModelError(f"Container {self.url} did not answer ({type(e).__name__}: "
                             f"{e})") from None
        if r.status_code >= 400:
            raise _upstream_error(self.url, r)
        return r.content, r.headers.get("content-type", "application/octet-stream")

    async def close(self) -> None:
        await self.client.aclose()


def _upstream_error(url: str, r: httpx.Response) -> RuntimeServiceError:
    message = r.text[:500]
    try:
        doc = orjson.loads(r.content)
        if isinstance(doc, dict):
            message = str(doc.get("Message") or doc.get("message") or message)
    except orjson.JSONDecodeError:
        pass
    return ModelError(f"Container {url} answered {r.status_code}: {message}")


def build_steps(settings: ModelServerSettings, metrics_for: dict[str, ModelServerMetrics],
                pool: ThreadPoolExecutor) -> list[Step]:
    assert settings.pipeline is not None
    steps: list[Step] = []
    for spec in settings.pipeline.steps:
        if spec.kind == "model":
            steps.append(ModelStep(spec, settings, metrics_for[spec.name], pool))
        elif spec.kind == "handler":
            steps.append(HandlerStep(spec, pool, settings.model_base_dir))
        else:
            steps.append(UrlStep(spec))
    return steps
