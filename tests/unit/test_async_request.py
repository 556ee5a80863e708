"""Pure parts of async inference: header parsing, locations (S3OutputPathExtension and
Filename included), bodies, backlog, backoff."""

from __future__ import annotations

import orjson
import pytest

from kubeinfer_runtime.contract import (
    AsyncBacklog,
    AsyncQueueKeys,
    AsyncRoute,
    AsyncWorkerSettings,
    failure_location,
    output_location,
)
from kubeinfer_runtime.errors import ValidationError
from kubeinfer_runtime.queue.notifier import backoff_s
from kubeinfer_runtime.queue.request import (
    AsyncRequest,
    failure_body,
    filename,
    location_problem,
    notification,
    parse_async_request,
    path_extension,
)

ROUTE = AsyncRoute(queue="ns.iris", output_path="s3://b/out", failure_path="s3://b/failed",
                   request_ttl_s=3600, invocation_timeout_s=60)


def _parse(**headers: str) -> AsyncRequest:
    base = {"x-amzn-sagemaker-inputlocation": "s3://b/in/x.json"}
    return parse_async_request("iris", ROUTE, {**base, **headers}, now=1000.0, new_id="gen-1")


def test_defaults_come_from_the_route() -> None:
    req = _parse()
    assert req.inference_id == "gen-1"
    assert req.output_location == "s3://b/out/gen-1.out"
    assert req.failure_location == "s3://b/failed/gen-1-error.out"
    assert req.expires_at == 1000.0 + 3600
    assert req.invocation_timeout_s == 60
    assert req.content_type == "application/json"


def test_client_headers_override_defaults() -> None:
    req = _parse(**{"x-amzn-sagemaker-inference-id": "abc-1",
                    "x-amzn-sagemaker-requestttlseconds": "120",
                    "x-amzn-sagemaker-invocationtimeoutseconds": "5",
                    "x-amzn-sagemaker-content-type": "text/csv",
                    "x-amzn-sagemaker-accept": "text/csv",
                    "x-amzn-sagemaker-custom-attributes": "k=v"})
    assert req.inference_id == "abc-1"
    assert req.output_location == "s3://b/out/abc-1.out"
    assert req.expires_at == 1120.0
    assert req.invocation_timeout_s == 5
    assert (req.content_type, req.accept, req.custom_attributes) == ("text/csv", "text/csv",
                                                                      "k=v")


def test_fields_round_trip() -> None:
    req = _parse()
    assert AsyncRequest.from_fields(req.to_fields()) == req
    with pytest.raises(ValueError, match="lacks field 'endpoint'"):
        AsyncRequest.from_fields({k: v for k, v in req.to_fields().items() if k != "endpoint"})
    assert req.expired(1000.0 + 3600) and not req.expired(1000.0 + 3599)


@pytest.mark.parametrize(("headers", "fragment"), [
    ({"x-amzn-sagemaker-inputlocation": ""}, "no X-Amzn-SageMaker-InputLocation"),
    ({"x-amzn-sagemaker-inputlocation": "https://x/y"}, "unsupported scheme 'https'"),
    ({"x-amzn-sagemaker-inputlocation": "s3://bucket-only"}, "s3://bucket/key"),
    ({"x-amzn-sagemaker-inputlocation": "s3://b/a/../secret"}, "contains '..'"),
    ({"x-amzn-sagemaker-inputlocation": "file://relative/x"}, "absolute path"),
    ({"x-amzn-sagemaker-inference-id": "has/slash"}, "InferenceId 'has/slash' is not valid"),
    ({"x-amzn-sagemaker-inference-id": "x" * 65}, "is not valid"),
    ({"x-amzn-sagemaker-requestttlseconds": "59"}, "from 60 to 21600"),
    ({"x-amzn-sagemaker-requestttlseconds": "soon"}, "not a whole number"),
    ({"x-amzn-sagemaker-invocationtimeoutseconds": "3601"}, "from 1 to 3600"),
    # A pattern ending in '$' still matches before a final newline: fullmatch does not.
    ({"x-amzn-sagemaker-inference-id": "abc-1\n"}, "is not valid"),
])
def test_bad_headers_are_validation_errors(headers: dict[str, str], fragment: str) -> None:
    with pytest.raises(ValidationError) as info:
        _parse(**headers)
    assert fragment in info.value.message
    assert info.value.status == 400
    assert info.value.message[0].isupper() and not info.value.message.endswith(".")


@pytest.mark.parametrize("header", ["x-amzn-sagemaker-inference-id",
                                    "x-amzn-sagemaker-requestttlseconds",
                                    "x-amzn-sagemaker-inputlocation"])
def test_errors_quote_a_short_prefix_at_most(header: str) -> None:
    """A 60 KB header value comes back as a short prefix, not whole."""
    value = ("s3://in/" if header.endswith("location") else "") + "\x01" * 60_000
    with pytest.raises(ValidationError) as info:
        _parse(**{header: value})
    assert len(info.value.message) < 1000


def test_location_problem_accepts_good_locations() -> None:
    assert location_problem("s3://b/k", "X") is None
    assert location_problem("file:///tmp/in.json", "X") is None


def test_notification_has_sagemaker_shape() -> None:
    req = _parse()
    ok = orjson.loads(notification(req, ok=True, now=1001.5, region="eu-west-1",
                                   output_content_type="application/json"))
    assert ok["invocationStatus"] == "Completed"
    assert ok["inferenceId"] == "gen-1"
    assert ok["responseParameters"] == {"contentType": "application/json",
                                        "outputLocation": "s3://b/out/gen-1.out"}
    assert ok["requestParameters"]["inputLocation"] == "s3://b/in/x.json"
    assert ok["eventTime"] == "1970-01-01T00:16:41.500Z"
    assert ok["awsRegion"] == "eu-west-1"
    bad = orjson.loads(notification(req, ok=False, now=1001.0, failure_reason="boom"))
    assert bad["invocationStatus"] == "Failed" and bad["failureReason"] == "boom"
    assert bad["responseParameters"]["failureLocation"] == "s3://b/failed/gen-1-error.out"


def test_failure_body_names_the_error() -> None:
    body = orjson.loads(failure_body(_parse(), "ModelError", "It broke", 4))
    assert body["ErrorCode"] == "ModelError"
    assert body["Message"] == body["message"] == "It broke"
    assert body["attempts"] == 4


def test_locations_are_deterministic() -> None:
    assert output_location("s3://b/out/", "id1") == "s3://b/out/id1.out"
    assert failure_location("file:///f", "id1") == "file:///f/id1-error.out"


def test_queue_keys_share_one_hash_tag() -> None:
    keys = AsyncQueueKeys(queue="ns.ep")
    names = [keys.stream, keys.dead_letter, keys.inference("x")]
    assert all("{ns.ep}" in n for n in names)  # one Redis Cluster slot for the Lua script
    assert len(set(names)) == 3


def test_backlog_from_xinfo() -> None:
    groups = [{"name": "other", "lag": 99, "pending": 9},
              {"name": "workers", "lag": 7, "pending": 3}]
    consumers = [{"name": "a", "idle": 100}, {"name": "dead", "idle": 60_000}]
    b = AsyncBacklog.from_xinfo(groups, consumers, "workers", 10)
    assert (b.queued, b.in_flight, b.workers, b.total) == (7, 3, 1, 10)
    assert b.per_instance == 10.0
    unknown_lag = AsyncBacklog.from_xinfo([{"name": "workers", "lag": None, "pending": 2}],
                                          [], "workers", 12)
    assert unknown_lag.queued == 12 and unknown_lag.per_instance == 14.0
    assert AsyncBacklog.from_xinfo([], [], "workers", 4).total == 4


def test_notification_backoff_doubles_and_is_capped() -> None:
    assert [backoff_s(n, 0.5) for n in (1, 2, 3)] == [0.5, 1.0, 2.0]
    assert backoff_s(20, 0.5) == 30.0


def test_worker_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in {"KUBEINFER_MODEL_URI": "file:///m.onnx", "KUBEINFER_REDIS_URL": "redis://r",
                 "KUBEINFER_QUEUE": "q", "KUBEINFER_OUTPUT_PATH": "s3://b/o",
                 "KUBEINFER_FAILURE_PATH": "s3://b/f", "KUBEINFER_MAX_RETRIES": "0"}.items():
        monkeypatch.setenv(k, v)
    s = AsyncWorkerSettings()
    assert (s.queue, s.max_retries, s.max_concurrency) == ("q", 0, 4)


def test_extension_and_filename_place_output_and_failure() -> None:
    req = _parse(**{"x-amzn-sagemaker-s3outputpathextension": "tenant-a/2026-05",
                    "x-amzn-sagemaker-filename": "result.json"})
    assert req.output_location == "s3://b/out/tenant-a/2026-05/result.json"
    # The failure object gets the extension too, and the name with "-error" before its
    # suffix, as <id>.out / <id>-error.out: never the output's key, even in one folder.
    assert req.failure_location == "s3://b/failed/tenant-a/2026-05/result-error.json"
    assert AsyncRequest.from_fields(req.to_fields()) == req


def test_extension_alone_keeps_the_default_names() -> None:
    req = _parse(**{"x-amzn-sagemaker-s3outputpathextension": "batch-7"})
    assert req.output_location == "s3://b/out/batch-7/gen-1.out"
    assert req.failure_location == "s3://b/failed/batch-7/gen-1-error.out"


def test_filename_alone_and_without_a_suffix() -> None:
    req = _parse(**{"x-amzn-sagemaker-filename": "scores"})
    assert req.output_location == "s3://b/out/scores"
    assert req.failure_location == "s3://b/failed/scores-error"


def test_extension_is_normalised_below_the_output_path() -> None:
    req = _parse(**{"x-amzn-sagemaker-s3outputpathextension": "/a//b/./c/",
                    "x-amzn-sagemaker-filename": "r.out"})
    assert req.output_location == "s3://b/out/a/b/c/r.out"
    assert path_extension("x/...y/(1)*!'_") == "x/...y/(1)*!'_"  # '...' is a name, not '..'
    assert path_extension(None) == path_extension("") == ""
    assert filename(None) == ""


def test_file_output_path_takes_the_extension() -> None:
    route = AsyncRoute(queue="q", output_path="file:///srv/out/", failure_path="file:///srv/f")
    req = parse_async_request("iris", route, {
        "x-amzn-sagemaker-inputlocation": "file:///srv/in.json",
        "x-amzn-sagemaker-s3outputpathextension": "t1", "x-amzn-sagemaker-filename": "a.json",
        "x-amzn-sagemaker-inference-id": "id-1"})
    assert req.output_location == "file:///srv/out/t1/a.json"
    assert req.failure_location == "file:///srv/f/t1/a-error.json"


@pytest.mark.parametrize(("header", "value", "fragment"), [
    ("s3outputpathextension", "a/../../secret", "contains '..'"),
    ("s3outputpathextension", "..", "contains '..'"),
    ("s3outputpathextension", "/", "names no folder"),
    ("s3outputpathextension", "./.", "names no folder"),
    ("s3outputpathextension", "s3://other/bucket", "no s3:// or https:// prefix"),
    ("s3outputpathextension", "a b", "is not valid"),
    ("s3outputpathextension", "%2e%2e/x", "is not valid"),
    ("s3outputpathextension", "x" * 513, "1 to 512"),
    ("s3outputpathextension", "tenant-a\n", "is not valid"),
    ("s3outputpathextension", "x" * 256, "at most 255 bytes"),
    ("s3outputpathextension", "ok/" + "x" * 256 + "/ok", "folder name of 256 bytes"),
    ("filename", "../x", "X-Amzn-SageMaker-Filename '../x' is not valid"),
    ("filename", "a/b", "no '/'"),
    ("filename", "a.tar.gz", "at most one '.'"),
    ("filename", "-a", "starting with a letter or digit"),
    ("filename", "x" * 33, "1 to 32"),
    ("filename", "result.json\n", "is not valid"),
])
def test_bad_extension_or_filename_is_refused(header: str, value: str, fragment: str) -> None:
    with pytest.raises(ValidationError) as info:
        _parse(**{f"x-amzn-sagemaker-{header}": value})
    message = info.value.message
    assert fragment in message
    assert ("S3OutputPathExtension" if header.startswith("s3") else "Filename") in message
    assert info.value.status == 400
    assert message[0].isupper() and not message.endswith(".")


def test_a_queued_entry_cannot_point_outside_a_location() -> None:
    fields = _parse().to_fields()
    with pytest.raises(ValueError, match=r"output_location .* contains '\.\.'"):
        AsyncRequest.from_fields({**fields, "output_location": "s3://b/out/../../etc/x"})
    with pytest.raises(ValueError, match=r"failure_location .* unsupported scheme"):
        AsyncRequest.from_fields({**fields, "failure_location": "/etc/passwd"})


def test_an_extension_segment_may_be_as_long_as_a_file_name() -> None:
    """255 bytes is what a file:// output's folder may be named; one more can never be
    written, so the gateway refuses it rather than queue a request that cannot end."""
    req = _parse(**{"x-amzn-sagemaker-s3outputpathextension": "x" * 255 + "/" + "y" * 255})
    assert req.output_location == f"s3://b/out/{'x' * 255}/{'y' * 255}/gen-1.out"


def test_s3_keys_longer_than_s3_allows_are_refused() -> None:
    """S3 refuses a key over 1024 bytes on every try: refused at the gateway instead."""
    longest = "in/" + "k" * 1021
    assert _parse(**{"x-amzn-sagemaker-inputlocation": f"s3://b/{longest}"})
    for key in ("in/" + "k" * 1022, "in/" + "\u00e9" * 511):  # 1025 and 1025 bytes
        with pytest.raises(ValidationError) as info:
            _parse(**{"x-amzn-sagemaker-inputlocation": f"s3://b/{key}"})
        assert info.value.status == 400
        assert "InputLocation" in info.value.message
        assert "names an S3 key of 1025 bytes" in info.value.message
    assert location_problem("file:///" + "d/" * 600 + "x", "X") is None  # S3's limit only
    # The output's key is the route's path, the extension and the name: too long, the
    # header is named.
    route = AsyncRoute(queue="q", output_path="s3://b/" + "o" * 600, failure_path="s3://b/f")
    with pytest.raises(ValidationError) as info:
        parse_async_request("iris", route, {
            "x-amzn-sagemaker-inputlocation": "s3://b/in/x.json",
            "x-amzn-sagemaker-s3outputpathextension": "x" * 255 + "/" + "y" * 255})
    assert "S3OutputPathExtension" in info.value.message and "1024 bytes" in info.value.message
    assert info.value.status == 400


def test_the_ttl_runs_on_redis_clock_not_the_workers() -> None:
    """The gateway stamped the request at 1000 (TTL 60 s); Redis stamped its entry at the
    same moment. A worker whose own clock runs 2 minutes ahead takes it 10 s later: not
    expired (it was, on the worker's clock alone); 61 s later: expired."""
    req = _parse(**{"x-amzn-sagemaker-requestttlseconds": "60"})
    entry = "1000000-0"  # Redis's milliseconds at the XADD
    ahead = 120.0  # the worker's clock less Redis's
    worker_now = 1010.0 + ahead
    assert req.expired(worker_now)  # the old reading: expired at once
    assert not req.expired(worker_now, entry_id=entry, queue_now=worker_now - ahead)
    later = 1061.0 + ahead
    assert req.expired(later, entry_id=entry, queue_now=later - ahead)
    # An id that is not a stream id falls back to the worker's clock.
    assert req.expired(worker_now, entry_id="bogus", queue_now=worker_now - ahead)


def test_a_worker_learns_how_far_redis_clock_is() -> None:
    import asyncio
    from types import SimpleNamespace

    from kubeinfer_runtime.queue.worker import Worker

    class Clock:
        async def time(self) -> tuple[int, int]:
            return 1_000_000, 500_000  # Redis: 1,000,000.5

    worker = Worker.__new__(Worker)
    worker.redis = Clock()
    worker.processor = SimpleNamespace(clock_offset_s=0.0)  # type: ignore[assignment]
    asyncio.run(worker._read_redis_clock())
    import time

    assert abs(worker.processor.clock_offset_s - (1_000_000.5 - time.time())) < 5
