"""Header mapping between client, gateway and model server (gateway/headers.py)."""

from __future__ import annotations

from kubeinfer_runtime.gateway.headers import response_headers, split_request_headers


def test_request_headers_forward_only_the_sagemaker_ones() -> None:
    inbound = split_request_headers([
        (b"host", b"gw:8080"),
        (b"authorization", b"AWS4-HMAC-SHA256 Credential=..."),
        (b"x-amz-date", b"20260101T000000Z"),
        (b"content-type", b"text/csv"),
        (b"accept", b"application/json"),
        (b"content-length", b"12"),
        (b"x-amzn-sagemaker-custom-attributes", b"trace=1"),
        (b"x-amzn-sagemaker-inference-id", b"req-7"),
        (b"x-amzn-sagemaker-target-variant", b"canary"),
        (b"x-amzn-sagemaker-target-model", b"m.tar.gz"),
        (b"user-agent", b"Boto3/1.x"),
    ])
    assert inbound.forwarded == [
        (b"content-type", b"text/csv"),
        (b"accept", b"application/json"),
        (b"x-amzn-sagemaker-custom-attributes", b"trace=1"),
        (b"x-amzn-sagemaker-inference-id", b"req-7"),
        (b"x-amzn-sagemaker-target-model", b"m.tar.gz"),
    ]
    assert inbound.target_variant == "canary"
    assert inbound.content_length == 12


def test_missing_or_empty_target_variant_means_by_weight() -> None:
    assert split_request_headers([]).target_variant is None
    assert split_request_headers([(b"x-amzn-sagemaker-target-variant", b" ")]
                                 ).target_variant is None


def test_garbled_content_length_is_ignored_not_trusted() -> None:
    assert split_request_headers([(b"content-length", b"-5")]).content_length is None
    assert split_request_headers([(b"content-length", b"1e9")]).content_length is None


def test_response_headers_pass_through_what_boto3_reads_and_add_the_variant() -> None:
    out = response_headers([
        (b"content-type", b"application/json"),
        (b"content-length", b"999"),  # replaced by the real length
        (b"x-amzn-sagemaker-custom-attributes", b"echo=1"),
        (b"x-amzn-errortype", b"ModelError:"),
        (b"server", b"uvicorn"),
        (b"date", b"Thu, 01 Jan 2026 00:00:00 GMT"),
    ], b"canary", 42)
    assert out == [
        (b"content-type", b"application/json"),
        (b"x-amzn-sagemaker-custom-attributes", b"echo=1"),
        (b"x-amzn-errortype", b"ModelError:"),
        (b"x-amzn-invoked-production-variant", b"canary"),
        (b"content-length", b"42"),
    ]
