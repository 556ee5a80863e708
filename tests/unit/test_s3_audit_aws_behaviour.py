"""What real Amazon S3 does that SeaweedFS never does, played by a fake HTTP layer.

Every request the minio client sends goes through ``urllib3.PoolManager.urlopen``; the
fake below answers like AWS: a bucket lives in one region (a request signed for another
is refused 301 with ``x-amz-bucket-region``), GetBucketLocation needs a permission the
role lacks, temporary keys need their session token, and CompleteMultipartUpload may
answer 200 OK with an ``<Error>`` body.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import urllib3

from kubeinfer_runtime.batch.errors import StoreFailed
from kubeinfer_runtime.batch.store import Store, composable
from kubeinfer_runtime.contract import S3Settings
from kubeinfer_runtime.errors import ValidationError
from kubeinfer_runtime.storage.fetch import StorageUnavailable, fetch_model, s3_client
from kubeinfer_runtime.storage.target import parse_prefix
from kubeinfer_runtime.storage.uri import InvalidModelUri, parse_model_uri

BUCKET_REGION = "eu-west-1"
_CRED_REGION = re.compile(r"Credential=[^/]+/\d{8}/([a-z0-9-]+)/s3/")


def _xml_error(code: str, extra: str = "") -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>{code}</Message>{extra}<RequestId>r</RequestId>"
            "<HostId>h</HostId></Error>").encode()


class FakeAws:
    """Answers requests for bucket ``bkt`` (in :data:`BUCKET_REGION`) like AWS S3."""

    def __init__(self, *, error_on_complete: bool = False) -> None:
        self.error_on_complete = error_on_complete
        #: The role may not s3:ListBucket: S3 then answers a missing key 403, not 404.
        self.no_list_bucket = False
        self.requests: list[tuple[str, str, dict[str, Any]]] = []
        self.objects: dict[str, bytes] = {"k": b"model-bytes"}
        self.parts: dict[int, bytes] = {}

    def urlopen(self, method: str, url: str, body: Any = None, headers: Any = None,
                preload_content: bool = True, **_: Any) -> urllib3.HTTPResponse:
        hdrs = {k.lower(): v for k, v in dict(headers or {}).items()}
        self.requests.append((method, url, hdrs))
        parts = urlsplit(url)
        query = parse_qs(parts.query, keep_blank_values=True)
        found = _CRED_REGION.search(str(hdrs.get("authorization", "")))
        signed = found.group(1) if found else ""
        if "location" in query:
            return self._answer(403, _xml_error("AccessDenied"), preload_content)
        if str(hdrs.get("authorization", "")).find("Credential=ASIA") >= 0 \
                and "x-amz-security-token" not in hdrs:
            return self._answer(403, _xml_error("InvalidAccessKeyId"), preload_content)
        if parts.hostname != f"bkt.s3.{BUCKET_REGION}.amazonaws.com" or signed != BUCKET_REGION:
            # What S3 answers a request sent to the wrong regional endpoint.
            body_ = b"" if method == "HEAD" else _xml_error(
                "PermanentRedirect", f"<Endpoint>b.s3.{BUCKET_REGION}.amazonaws.com</Endpoint>")
            return self._answer(301, body_, preload_content,
                                {"x-amz-bucket-region": BUCKET_REGION})
        key = parts.path.lstrip("/")
        if method == "POST" and "uploads" in query:
            return self._answer(200, (
                "<InitiateMultipartUploadResult><Bucket>bkt</Bucket><Key>" + key +
                "</Key><UploadId>u1</UploadId></InitiateMultipartUploadResult>").encode(),
                preload_content)
        if method == "PUT" and "partNumber" in query and "x-amz-copy-source" in hdrs:
            src = unquote(str(hdrs["x-amz-copy-source"]).lstrip("/")).split("/", 1)[1]
            self.parts[int(query["partNumber"][0])] = self.objects[src]
            return self._answer(200, b'<CopyPartResult><ETag>"e"</ETag>'
                                b"<LastModified>2026-12-07T00:00:00.000Z</LastModified>"
                                b"</CopyPartResult>", preload_content)
        if method == "PUT" and "partNumber" in query:
            self.parts[int(query["partNumber"][0])] = bytes(body)
            return self._answer(200, b"", preload_content, {"ETag": '"e"'})
        if method == "POST" and "uploadId" in query:
            if self.error_on_complete:
                # Documented: "a 200 OK response can contain either a success or an error".
                return self._answer(200, _xml_error("InternalError"), preload_content)
            self.objects[key] = b"".join(self.parts[n] for n in sorted(self.parts))
            return self._answer(200, (
                "<CompleteMultipartUploadResult><Bucket>bkt</Bucket><Key>" + key +
                '</Key><ETag>"x-2"</ETag></CompleteMultipartUploadResult>').encode(),
                preload_content)
        if method == "DELETE":
            return self._answer(204, b"", preload_content)
        if method == "PUT":
            self.objects[key] = bytes(body)
            return self._answer(200, b"", preload_content, {"ETag": '"e"'})
        if key not in self.objects and self.no_list_bucket:
            return self._answer(403, b"" if method == "HEAD" else _xml_error("AccessDenied"),
                                preload_content)
        if key not in self.objects:
            return self._answer(404, b"" if method == "HEAD" else _xml_error("NoSuchKey"),
                                preload_content)
        data = self.objects[key]
        return self._answer(200, b"" if method == "HEAD" else data, preload_content,
                            {"Content-Length": str(len(data)), "ETag": '"e"',
                             "Last-Modified": "Mon, 07 Dec 2026 00:00:00 GMT"})

    @staticmethod
    def _answer(status: int, body: bytes, preload: bool,
                headers: dict[str, str] | None = None) -> urllib3.HTTPResponse:
        hdrs = {"Content-Type": "application/xml"} if body.startswith(b"<") else {}
        hdrs.update(headers or {})
        return urllib3.HTTPResponse(body=io.BytesIO(body), status=status, headers=hdrs,
                                    preload_content=preload)


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeAws]:
    fake = FakeAws()
    monkeypatch.setattr(urllib3.PoolManager, "urlopen",
                        lambda self, *a, **kw: fake.urlopen(*a, **kw))
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    yield fake


def _read(settings: S3Settings) -> bytes:
    resp = s3_client(settings).get_object("bkt", "k")
    try:
        return bytes(resp.read())
    finally:
        resp.close()
        resp.release_conn()


def test_bucket_outside_the_pinned_region_is_reached(aws: FakeAws) -> None:
    # AWS_REGION (injected by EKS into IRSA pods) names the pod's region, not the bucket's.
    settings = S3Settings(access_key="AKIAX", secret_key="s", region="us-west-2")
    assert _read(settings) == b"model-bytes"
    client = s3_client(settings)
    assert client.stat_object("bkt", "k").size == len(b"model-bytes")  # HEAD: no body


def test_no_region_does_not_need_get_bucket_location(aws: FakeAws) -> None:
    # A role allowed GetObject but not GetBucketLocation must still read its objects.
    assert _read(S3Settings(access_key="AKIAX", secret_key="s")) == b"model-bytes"
    assert not any("location" in url for _, url, _ in aws.requests)


def test_temporary_keys_from_aws_env_carry_their_session_token(
        aws: FakeAws, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ASIATEMP")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "tok")
    settings = S3Settings(access_key="ASIATEMP", secret_key="s", region=BUCKET_REGION)
    assert _read(settings) == b"model-bytes"
    assert aws.requests[-1][2]["x-amz-security-token"] == "tok"


def test_session_token_is_not_attached_to_other_keys(
        aws: FakeAws, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ASIATEMP")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "tok")
    settings = S3Settings(access_key="seaweed", secret_key="s", region=BUCKET_REGION)
    assert _read(settings) == b"model-bytes"
    assert "x-amz-security-token" not in aws.requests[-1][2]


def test_multipart_complete_answered_200_with_error_is_a_failure(aws: FakeAws) -> None:
    aws.error_on_complete = True
    store = Store(S3Settings(access_key="AKIAX", secret_key="s", region=BUCKET_REGION))
    data = b"x" * (6 << 20)  # over minio's 5 MiB part: a multipart upload
    with pytest.raises(StoreFailed):
        store.write("s3://bkt/out/result.out", io.BytesIO(data), len(data))
    assert "out/result.out" not in aws.objects


def test_multipart_complete_success_still_writes(aws: FakeAws) -> None:
    store = Store(S3Settings(access_key="AKIAX", secret_key="s", region=BUCKET_REGION))
    data = b"y" * (6 << 20)
    store.write("s3://bkt/out/result.out", io.BytesIO(data), len(data))
    assert aws.objects["out/result.out"] == data


def test_directory_bucket_fails_clearly(aws: FakeAws) -> None:
    with pytest.raises(InvalidModelUri, match="directory bucket"):
        parse_model_uri("s3://models--usw2-az1--x-s3/m.onnx")
    with pytest.raises(ValidationError, match="directory bucket"):
        parse_prefix("s3://models--usw2-az1--x-s3/mme/")
    client = s3_client(S3Settings(access_key="AKIAX", secret_key="s", region="us-west-2"))
    with pytest.raises(ValueError, match="directory bucket"):
        client.get_object("models--usw2-az1--x-s3", "m.onnx")
    assert aws.requests == []


def test_concat_answered_200_with_error_keeps_its_parts(aws: FakeAws) -> None:
    # finalize deletes the parts once concat returns: a silent failure loses the output.
    aws.error_on_complete = True
    aws.objects.update({"p/0": b"a" * (5 << 20), "p/1": b"b"})
    store = Store(S3Settings(access_key="AKIAX", secret_key="s", region=BUCKET_REGION))
    with pytest.raises(StoreFailed):
        store.concat("s3://bkt/out/x.out", ["s3://bkt/p/0", "s3://bkt/p/1"])
    assert "out/x.out" not in aws.objects
    assert aws.parts == {1: b"a" * (5 << 20), 2: b"b"}  # copied server-side, then refused


def test_concat_composes_server_side(aws: FakeAws) -> None:
    aws.objects.update({"p/0": b"a" * (5 << 20), "p/1": b"b"})
    store = Store(S3Settings(access_key="AKIAX", secret_key="s", region=BUCKET_REGION))
    store.concat("s3://bkt/out/x.out", ["s3://bkt/p/0", "s3://bkt/p/1"])
    assert aws.objects["out/x.out"] == b"a" * (5 << 20) + b"b"


GIB5 = 5 << 30
MIB5 = 5 << 20


def test_composable_follows_s3_part_rules() -> None:
    assert composable([MIB5, 1])
    assert not composable([MIB5 - 1, 1])
    assert not composable([MIB5])  # one source: nothing to join
    # Over 5 GiB a source is copied as 5 GiB parts plus its remainder, itself a part.
    assert composable([2 * GIB5, 1])
    assert composable([GIB5 + MIB5, 1])
    assert not composable([GIB5 + (1 << 20), 1])
    assert composable([MIB5, GIB5 + 1])  # the last part of all may be small
    # 10,000 parts, not sources.
    assert composable([5000 * GIB5, 5000 * GIB5])
    assert not composable([5000 * GIB5, 5000 * GIB5 + 1])


class _NoCompose:
    def compose_object(self, *_: Any) -> None:
        # What minio does for these sizes (before any request): see _calc_part_count.
        raise ValueError("last part size is less than 5242880")


def test_concat_streams_sources_s3_cannot_compose(monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(S3Settings(access_key="AKIAX", secret_key="s", region=BUCKET_REGION))
    sizes = {"s3://bkt/p/0": GIB5 + (1 << 20), "s3://bkt/p/1": 10}
    written: list[int] = []
    monkeypatch.setattr(store, "_minio", lambda: _NoCompose())
    monkeypatch.setattr(store, "size", lambda uri: sizes[uri])
    monkeypatch.setattr(store, "chunks", lambda uri, start=0: (b for b in [b"z" * 3]))
    monkeypatch.setattr(store, "write", lambda uri, src, n, *a: written.append(n))
    store.concat("s3://bkt/out/x.out", list(sizes))
    assert written == [6]


def test_missing_object_without_list_bucket_says_what_403_may_mean(
        aws: FakeAws, tmp_path: Path) -> None:
    aws.no_list_bucket = True
    settings = S3Settings(access_key="AKIAX", secret_key="s", region=BUCKET_REGION)
    with pytest.raises(StoreFailed, match="s3:ListBucket"):
        Store(settings).size("s3://bkt/missing")
    with pytest.raises(StorageUnavailable, match="s3:ListBucket"):
        fetch_model("s3://bkt/missing.onnx", base_dir="/", cache_dir=str(tmp_path), s3=settings)
