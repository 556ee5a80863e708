"""Python handler steps (``handler: module:function``): importing and calling them.

The contract a handler implements, the same as any SageMaker container's
``/invocations`` minus HTTP::

    def handler(body: bytes, content_type: str | None) -> tuple[bytes, str]:
        ...  # return (response body, response content type)

It receives the request body and Content-Type (from the client, or from the
previous step in a serial pipeline) and returns the body and Content-Type
handed to the next step (or the client). It runs in a worker thread, so it
may block; it must be thread-safe if ``inferenceThreads`` > 1. Raising
``ValueError`` means the input is bad; any exception fails the request with a
424 naming the step. ``examples/handlers/iris_steps.py`` is a worked example.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

#: In every import failure's message: the step will never be ready in this
#: process, and the local supervisor gives a rollout up at once on these words.
from kubeinfer_runtime.server.state import LOAD_FAILED_MARKER as LOAD_FAILED

Handler = Callable[[bytes, str | None], tuple[bytes, str]]


class HandlerImportError(Exception):
    """The handler cannot be imported; the message says which part and the fix."""


def parse_handler(ref: str) -> tuple[str, str]:
    """``"pkg.module:function"`` → ``("pkg.module", "function")``."""
    module, sep, func = ref.partition(":")
    if not sep or not module or not func or not all(
            p.isidentifier() for p in (*module.split("."), *func.split("."))):
        raise HandlerImportError(f"Handler {ref!r} {LOAD_FAILED}: it must look like "
                                 "module:function, e.g. iris_steps:preprocess")
    return module, func


def import_handler(ref: str, code_dir: str | None = None) -> Handler:
    module_name, func_name = parse_handler(ref)
    if code_dir and code_dir not in sys.path:
        sys.path.insert(0, code_dir)
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as e:  # user code may even call sys.exit at import
        where = f" (looked in {code_dir} and the Python path)" if code_dir else ""
        raise HandlerImportError(f"Handler {ref!r} {LOAD_FAILED}: module {module_name!r} cannot "
                                 f"be imported{where}: {type(e).__name__}: {e}; check the "
                                 "module name and codeUri") from None
    obj: Any = module
    for part in func_name.split("."):
        obj = getattr(obj, part, None)
    if not callable(obj):
        raise HandlerImportError(f"Handler {ref!r} {LOAD_FAILED}: {module_name} has no callable "
                                 f"{func_name!r}: define def {func_name}(body, content_type)")
    fn: Handler = obj
    return fn


def call_handler(fn: Handler, ref: str, body: bytes,
                 content_type: str | None) -> tuple[bytes, str]:
    """Call ``fn`` and check it kept the contract (bytes and a content type back)."""
    out = fn(body, content_type)
    if (not isinstance(out, tuple) or len(out) != 2 or not isinstance(out[0], bytes | bytearray)
            or not isinstance(out[1], str)):
        raise TypeError(f"handler {ref} returned {type(out).__name__}, not (bytes, content_type)")
    return bytes(out[0]), out[1]
