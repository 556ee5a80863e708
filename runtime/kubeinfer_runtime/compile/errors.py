"""The compile package's errors: bad input (exit 42, retrying cannot help) or a failure.

``BadInput`` is the user's to fix (not an ONNX model, a calibration set that
does not fit the model, settings no compilation can satisfy); the Job fails at
once. Any other ``CompileError`` (object store unreachable, a crash in a
compiler) may pass on a retry. Messages follow the project's style: what is
wrong, naming the thing, and the fix; never the input's bytes.
"""

from __future__ import annotations


class CompileError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadInput(CompileError):
    """The model, calibration set or settings are wrong: retrying cannot help."""
