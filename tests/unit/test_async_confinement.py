"""Async input confinement (pure): the prefixes an InputLocation must be below, at the
gateway and again at the worker, and where a dequeued request may be written; and the
bounds of reading an input (the object store on local files and a fake minio response)."""

from __future__ import annotations

import io
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubeinfer_operator.api.async_config import AsyncConfig
from kubeinfer_runtime.contract import AsyncRoute, S3Settings
from kubeinfer_runtime.contract.async_paths import (
    FORMER_PATHS_GRACE_S,
    FORMER_PATHS_KEEP,
    FormerAsyncPaths,
    carry_former_paths,
    parse_former_paths,
    render_former_paths,
)
from kubeinfer_runtime.contract.locations import (
    default_input_paths,
    location_problem,
    normalize_prefix,
    prefix_problem,
    within,
)
from kubeinfer_runtime.errors import ValidationError
from kubeinfer_runtime.queue import objects
from kubeinfer_runtime.queue.objects import InputTooLarge, ObjectStore
from kubeinfer_runtime.queue.request import AsyncRequest, Confinement, parse_async_request

ROUTE = AsyncRoute(queue="q", output_path="s3://tenant-a/out", failure_path="s3://tenant-a/f")


def _parse(location: str, route: AsyncRoute = ROUTE) -> AsyncRequest:
    return parse_async_request("iris", route, {"x-amzn-sagemaker-inputlocation": location},
                               now=1.0, new_id="id-1")


def test_the_default_input_path_is_the_output_bucket() -> None:
    assert ROUTE.input_paths == ["s3://tenant-a/"]
    assert _parse("s3://tenant-a/in/rows.json").input_location == "s3://tenant-a/in/rows.json"
    assert default_input_paths("file:///data/async/out") == ["file:///data/async/"]
    # The parent of a top-level folder is the root: the folder itself instead.
    assert default_input_paths("file:///out") == ["file:///out/"]


@pytest.mark.parametrize("location", [
    "file:///proc/self/environ",
    "file:///etc/passwd",
    "file:///dev/zero",
    "s3://other-tenant-bucket/payroll.csv",
    "s3://tenant-a-evil/x",          # a bucket sharing the name's prefix
    "s3://tenant-a",                 # the bucket itself is no object
])
def test_inputs_outside_the_paths_are_refused_at_the_gateway(location: str) -> None:
    with pytest.raises(ValidationError) as info:
        _parse(location)
    assert info.value.status == 400
    message = info.value.message
    assert "InputLocation" in message
    assert message[0].isupper() and not message.endswith(".")


def test_the_refusal_names_the_allowed_prefixes_and_the_fix() -> None:
    with pytest.raises(ValidationError) as info:
        _parse("s3://other/x")
    assert "s3://tenant-a/" in info.value.message
    assert "spec.async.inputPath" in info.value.message


@pytest.mark.parametrize("location", [
    "s3://tenant-a/in/%2e%2e/%2e%2e/other/x",   # '..' after percent-decoding
    "s3://tenant-a/in/../x",
    "file:///data/in/%2E%2E/etc/passwd",
    "s3://[tenant-a/x",                          # urlsplit raises ValueError on it
    "s3://tenant-a/in/x%00y",
])
def test_encoded_parent_segments_and_unparsable_hosts_are_400_not_500(location: str) -> None:
    route = AsyncRoute(queue="q", output_path="s3://tenant-a/out", failure_path="s3://tenant-a/f",
                       input_paths=["s3://tenant-a/in", "file:///data/in"])
    with pytest.raises(ValidationError) as info:
        _parse(location, route)
    assert info.value.status == 400


def test_prefixes_are_folders() -> None:
    prefixes = [normalize_prefix("s3://b/in")]
    assert prefixes == ["s3://b/in/"]
    assert within("s3://b/in/x.json", prefixes)
    assert within("s3://b/in/deep/x.json", prefixes)
    assert not within("s3://b/input-secrets/x", prefixes)
    assert not within("s3://b/in/", prefixes)
    assert within("s3://b/in/a%20b.csv", prefixes)  # decoded before comparing


def test_explicit_input_paths_replace_the_default() -> None:
    route = AsyncRoute(queue="q", output_path="s3://b/out", failure_path="s3://b/f",
                       input_paths=["s3://uploads/tenant-a/", "file:///mnt/shared/in"])
    assert route.input_paths == ["s3://uploads/tenant-a/", "file:///mnt/shared/in/"]
    _parse("s3://uploads/tenant-a/x.json", route)
    _parse("file:///mnt/shared/in/x.json", route)
    with pytest.raises(ValidationError):
        _parse("s3://b/out/x.json", route)


@pytest.mark.parametrize(("prefix", "fragment"), [
    ("file:///", "whole filesystem"),
    ("file:///data/../etc", "'..'"),
    ("s3://", "names no bucket"),
    ("http://x/y", "s3://bucket"),
])
def test_bad_prefixes_are_refused(prefix: str, fragment: str) -> None:
    problem = prefix_problem(prefix, "inputPath[0]")
    assert problem is not None and fragment in problem


def test_the_spec_takes_input_paths_and_a_size_cap() -> None:
    cfg = AsyncConfig.model_validate({"outputPath": "s3://b/out"})
    assert cfg.input_paths == ["s3://b/"] and cfg.maxInputBytes == 1 << 30
    cfg = AsyncConfig.model_validate({"outputPath": "s3://b/out",
                                      "inputPath": ["s3://in/a", "file:///data"],
                                      "maxInputBytes": 1024})
    assert cfg.input_paths == ["s3://in/a/", "file:///data/"]
    with pytest.raises(ValueError, match=r"inputPath\[0\] .* contains '\.\.'"):
        AsyncConfig.model_validate({"outputPath": "s3://b/out",
                                    "inputPath": ["file:///data/../etc"]})
    with pytest.raises(ValueError, match="inputPath"):
        AsyncConfig.model_validate({"outputPath": "s3://b/out", "inputPath": ["file:///"]})


def _queued(**overrides: str) -> AsyncRequest:
    fields = _parse("s3://tenant-a/in/x.json").to_fields()
    return AsyncRequest.from_fields({**fields, **overrides})


def test_the_worker_refuses_forged_destinations() -> None:
    confinement = Confinement.of(["s3://tenant-a/"], "s3://tenant-a/out", "s3://tenant-a/f")
    assert confinement.destination_problem(_queued(), NOW) is None
    forged = _queued(output_location="s3://tenant-b/out/x.out")
    assert "outside the endpoint's outputPath" in (confinement.destination_problem(forged, NOW)
                                                    or "")
    forged = _queued(failure_location="s3://tenant-a/out/x-error.out")
    assert "failurePath" in (confinement.destination_problem(forged, NOW) or "")


NOW = 1_800_000_000.0


def test_requests_accepted_before_the_paths_changed_are_written_where_their_callers_look(
        ) -> None:
    """Queued under the old outputPath/failurePath (as the gateway made them then): written
    there until the pair's ``until``; a location below no single pair is still refused."""
    former = [FormerAsyncPaths(outputPath="s3://tenant-a/old-out",
                               failurePath="s3://tenant-a/old-f", until=NOW + 60)]
    confinement = Confinement.of(["s3://tenant-a/"], "s3://tenant-a/out", "s3://tenant-a/f",
                                 former)
    old = _queued(output_location="s3://tenant-a/old-out/x.out",
                  failure_location="s3://tenant-a/old-f/x-error.out")
    assert confinement.destination_problem(old, NOW) is None
    assert confinement.destination_problem(_queued(), NOW) is None  # the current pair
    assert "outputPath" in (confinement.destination_problem(old, NOW + 61) or "")  # expired
    mixed = _queued(output_location="s3://tenant-a/old-out/x.out",
                    failure_location="s3://tenant-b/x-error.out")
    assert confinement.destination_problem(mixed, NOW) is not None
    elsewhere = _queued(output_location="s3://tenant-b/old-out/x.out",
                        failure_location="s3://tenant-a/old-f/x-error.out")
    assert "outputPath" in (confinement.destination_problem(elsewhere, NOW) or "")


def test_a_replaced_pair_joins_the_former_ones_and_keeps_its_deadline() -> None:
    a, b, c = ("s3://x/a", "s3://x/af"), ("s3://x/b", "s3://x/bf"), ("s3://x/c", "s3://x/cf")
    assert carry_former_paths(None, [], a, NOW) == []  # the first paths
    assert carry_former_paths(a, [], a, NOW) == []  # unchanged
    first = carry_former_paths(a, [], b, NOW)
    assert first == [FormerAsyncPaths(outputPath=a[0], failurePath=a[1],
                                      until=NOW + FORMER_PATHS_GRACE_S)]
    # Rendered again later, unchanged: the same deadline (nothing rolls).
    assert carry_former_paths(b, first, b, NOW + 100) == first
    second = carry_former_paths(b, first, c, NOW + 100)
    assert [(p.outputPath, p.until) for p in second] == [
        (a[0], NOW + FORMER_PATHS_GRACE_S), (b[0], NOW + 100 + FORMER_PATHS_GRACE_S)]
    # Back to a: a is current, not former; b stays.
    back = carry_former_paths(c, second, a, NOW + 200)
    assert [p.outputPath for p in back] == [b[0], c[0]]
    # At most FORMER_PATHS_KEEP, the latest replaced.
    many: list[FormerAsyncPaths] = []
    current = ("s3://x/0", "s3://x/0f")
    for i in range(1, 10):
        nxt = (f"s3://x/{i}", f"s3://x/{i}f")
        many = carry_former_paths(current, many, nxt, NOW + i)
        current = nxt
    assert len(many) == FORMER_PATHS_KEEP
    assert [p.outputPath for p in many] == ["s3://x/5", "s3://x/6", "s3://x/7", "s3://x/8"]
    assert parse_former_paths(render_former_paths(many)) == many
    assert parse_former_paths("") == []
    with pytest.raises(ValueError, match="KUBEINFER_FORMER_PATHS"):
        parse_former_paths('[{"outputPath": 1}]')


def test_the_worker_refuses_forged_inputs() -> None:
    confinement = Confinement.of(["s3://tenant-a/"], "s3://tenant-a/out", "s3://tenant-a/f")
    assert confinement.input_problem(_queued()) is None
    for location in ("file:///proc/self/environ", "s3://other/payroll.csv",
                     "s3://tenant-a/%2e%2e/x", "gopher://x/y"):
        problem = confinement.input_problem(_queued(input_location=location))
        assert problem is not None and problem[0].isupper()


def test_location_problem_never_raises() -> None:
    for junk in ("s3://[", "file://[::1", "", "::", "s3:///", "x" * 5000, "file:///\n"):
        assert location_problem(junk, "X") is not None


def test_reading_an_input_costs_its_size_once(tmp_path: Path) -> None:
    """One buffer of the file's size, filled in place: not chunks and then their join
    (twice the input at the peak, so a 1 GB input needed a 2 GB worker)."""
    size = 16 << 20
    path = tmp_path / "in.bin"
    path.write_bytes(bytes(range(256)) * (size // 256))
    store = ObjectStore(S3Settings(), file_roots=[str(tmp_path)])
    tracemalloc.start()
    try:
        data = store.read(f"file://{path}")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(data) == size and data[:256] == bytes(range(256)) and data[-1] == 255
    assert peak < 1.3 * size, f"peak {peak / size:.2f}x the input"


class _Response:
    """What minio's get_object answers: a body, perhaps not the length it declares."""

    def __init__(self, body: bytes, declared: int | None) -> None:
        self.headers = {} if declared is None else {"content-length": str(declared)}
        self._body = io.BytesIO(body)
        self.readinto = self._body.readinto

    def stream(self, amt: int) -> Iterator[bytes]:
        return iter(lambda: self._body.read(amt), b"")

    def close(self) -> None:
        pass

    def release_conn(self) -> None:
        pass


class _Serving:
    def __init__(self, response: _Response) -> None:
        self.response = response

    def get_object(self, bucket: str, key: str) -> Any:
        return self.response


@pytest.mark.parametrize(("size", "declared"), [
    (0, 0), (10, 10), (3 << 20, 3 << 20),  # as declared (several chunks)
    (10, 25), (0, 7),                      # shorter: what is there
    ((2 << 20) + 5, 100), (50, 49),        # longer (decoded, or a file that grew)
    ((2 << 20) + 5, None), (0, None),      # nothing declared
])
def test_an_input_is_what_its_body_holds_whatever_was_declared(
        monkeypatch: pytest.MonkeyPatch, size: int, declared: int | None) -> None:
    body = bytes(i % 251 for i in range(size))
    monkeypatch.setattr(objects, "s3_client",
                        lambda s3, maxsize: _Serving(_Response(body, declared)))
    store = ObjectStore(S3Settings(endpoint_url="http://s3.invalid"), max_read_bytes=4 << 20)
    data = store.read("s3://b/in/x")
    assert isinstance(data, bytearray) and data == body


def test_a_body_longer_than_declared_still_meets_the_bound(
        monkeypatch: pytest.MonkeyPatch) -> None:
    body = b"x" * ((1 << 20) + 1)
    monkeypatch.setattr(objects, "s3_client", lambda s3, maxsize: _Serving(_Response(body, 10)))
    store = ObjectStore(S3Settings(endpoint_url="http://s3.invalid"), max_read_bytes=1 << 20)
    with pytest.raises(InputTooLarge, match=r"over the endpoint's maxInputBytes"):
        store.read("s3://b/in/x")
