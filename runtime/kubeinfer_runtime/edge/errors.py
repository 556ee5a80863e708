"""The edge package's one error base class, so callers catch every edge failure at once.

Messages follow the project's style (capitalised, no final period, name the object,
say the fix) and never quote key bytes or package contents.
"""

from __future__ import annotations


class EdgeError(Exception):
    """Base of every error raised by ``kubeinfer_runtime.edge``."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
