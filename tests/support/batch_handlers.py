"""Handler steps for batch tests: models whose answers are not one line per record."""

from __future__ import annotations


def with_header(body: bytes, content_type: str | None) -> tuple[bytes, str]:
    """The previous step's CSV answer under a header line (one more line than records)."""
    return b"sum\n" + body, content_type or "text/csv"


def line_per_record(body: bytes, content_type: str | None) -> tuple[bytes, str]:
    """A model that costs nothing: one CSV line (``1``) per line of the request."""
    return b"1\n" * body.count(b"\n"), "text/csv"
