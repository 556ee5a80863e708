"""``split_location`` parses plain URIs by hand (batch jobs parse two per object): it must
give exactly what urlsplit gives, for every URI, plain or hostile."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from hypothesis import given, settings
from hypothesis import strategies as st

from kubeinfer_runtime.contract.locations import split_location


def _by_urlsplit(uri: str) -> tuple[str, str, str] | None:
    try:
        parts = urlsplit(uri)
    except ValueError:
        return None
    if parts.scheme == "s3":
        return "s3", parts.netloc, unquote(parts.path.lstrip("/"))
    if parts.scheme == "file":
        return "file", parts.netloc, unquote(parts.path)
    return None


_CHARS = st.sampled_from(list("ab/:.%?#[]@ \t\r\n-_x\x00\x7fé2F"))


@settings(max_examples=3000)
@given(st.sampled_from(["file://", "file:///", "s3://", "s3:///", "S3://", "file:", " s3://"]),
       st.text(_CHARS, max_size=24))
def test_the_fast_path_agrees_with_urlsplit(prefix: str, rest: str) -> None:
    uri = prefix + rest
    assert split_location(uri) == _by_urlsplit(uri)


def test_plain_uris() -> None:
    assert split_location("file:///data/in/a.csv") == ("file", "", "/data/in/a.csv")
    assert split_location("s3://bucket/in/a.csv") == ("s3", "bucket", "in/a.csv")
    assert split_location("s3://bucket//in/a%20b.csv") == ("s3", "bucket", "in/a b.csv")
