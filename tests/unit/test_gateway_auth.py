"""Caller authentication at the gateway (gateway/auth.py).

Requests are signed by botocore itself, and captured from a real boto3
``sagemaker-runtime`` client (its ``before-send`` event answers in place of
the network), so the verifier is checked against what clients really send.
"""

from __future__ import annotations

import hashlib
import io
import logging
import random
import time
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit

import boto3  # type: ignore[import-untyped]
import orjson
import pytest
from botocore.auth import SigV4Auth  # type: ignore[import-untyped]
from botocore.awsrequest import AWSRequest, AWSResponse  # type: ignore[import-untyped]
from botocore.config import Config  # type: ignore[import-untyped]
from botocore.credentials import Credentials  # type: ignore[import-untyped]
from botocore.exceptions import ClientError  # type: ignore[import-untyped]

from kubeinfer_runtime.contract import auth as contract_auth
from kubeinfer_runtime.errors import RuntimeServiceError, render_error
from kubeinfer_runtime.gateway.auth import Authenticator, AuthMode
from kubeinfer_runtime.gateway.credentials import CallerCredentials, token_digest

AK = "AKIAKUBEINFER0001"
SK = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
AK2 = "AKIAKUBEINFER0002"
SK2 = "je7MtGbClwBF/2Zp9Utk/h3yCo8nvbEXAMPLEKEY"
URL = "http://gw.example:8080/endpoints/iris/invocations"
BODY = b'{"instances": [[5.1, 3.5, 1.4, 0.2]]}'

Headers = list[tuple[bytes, bytes]]
Request = tuple[bytes, bytes, Headers, bytes]


def creds(**keys: str) -> CallerCredentials:
    return CallerCredentials(keys or {AK: SK}, ())


def signed(url: str = URL, body: bytes = BODY, *, key: str = AK, secret: str = SK,
           region: str = "us-east-1", service: str = "sagemaker", method: str = "POST",
           headers: Sequence[tuple[str, str]] = (("Content-Type", "application/json"),),
           ) -> tuple[Request, float]:
    """A request signed by botocore now, as the gateway receives it, and its signing time."""
    request = AWSRequest(method=method, url=url, data=body)
    for name, value in headers:
        request.headers[name] = value
    SigV4Auth(Credentials(key, secret), service, region).add_auth(request)
    return wire(request.method, request.url, request.headers.items(), body), signed_at(request)


def wire(method: str, url: str, headers: Any, body: bytes | None) -> Request:
    """(method, target, headers, body) as uvicorn hands them over: the Host header added."""
    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    out: Headers = [(b"host", parts.netloc.encode())]
    for name, value in headers:
        out.append((name.lower().encode(), value if isinstance(value, bytes) else value.encode()))
    return method.encode(), target.encode(), out, body or b""


def signed_at(request: Any) -> float:
    stamp = request.context["timestamp"]
    return float(time.mktime(time.strptime(stamp, "%Y%m%dT%H%M%SZ")) - time.timezone)


def sigv4(at: float, credentials: CallerCredentials | None = None,
          **kwargs: Any) -> Authenticator:
    loaded = credentials if credentials is not None else creds()
    return Authenticator(AuthMode.SIGV4, lambda: loaded, clock=lambda: at, **kwargs)


def replace(headers: Headers, name: bytes, value: bytes) -> Headers:
    return [(n, value if n == name else v) for n, v in headers]


def expect(err: RuntimeServiceError | None, status: int, code: str) -> RuntimeServiceError:
    assert err is not None, "the request was accepted"
    assert (err.status, err.code) == (status, code), repr(err)
    assert err.message[0].isupper() and not err.message.endswith(".")
    return err


# -- botocore-signed requests


def test_the_right_key_passes_and_a_second_key_too() -> None:
    (method, target, headers, body), at = signed()
    two = creds(**{AK: SK, AK2: SK2})
    assert sigv4(at, two).check(method, target, headers, body) is None
    (method, target, headers, body), at = signed(key=AK2, secret=SK2)
    assert sigv4(at, two).check(method, target, headers, body) is None


def test_wrong_secret_is_an_invalid_signature() -> None:
    (method, target, headers, body), at = signed(secret=SK2)
    err = expect(sigv4(at).check(method, target, headers, body), 403, "InvalidSignatureException")
    assert err.message == ("The request signature we calculated does not match the signature "
                           "you provided. Check your AWS Secret Access Key and signing method")


def test_unknown_key_id_and_empty_credentials_are_unrecognized() -> None:
    (method, target, headers, body), at = signed(key=AK2)
    err = expect(sigv4(at).check(method, target, headers, body), 403,
                 "UnrecognizedClientException")
    assert err.message.startswith("The security token included in the request is invalid")
    assert AK2 not in err.message
    empty = CallerCredentials({}, ())
    expect(sigv4(at, empty).check(method, target, headers, body), 403,
           "UnrecognizedClientException")


def test_credentials_not_loaded_fail_closed_with_503() -> None:
    (method, target, headers, body), at = signed()
    for mode in (AuthMode.SIGV4, AuthMode.TOKEN):
        auth = Authenticator(mode, lambda: None, clock=lambda: at)
        req_headers = headers if mode is AuthMode.SIGV4 else [(b"authorization", b"Bearer t")]
        err = expect(auth.check(method, target, req_headers, body), 503, "ServiceUnavailable")
        assert "credentials are not configured" in err.message


def test_auth_mode_is_the_route_tables() -> None:
    assert AuthMode is contract_auth.AuthMode
    assert Authenticator("SigV4", lambda: None).mode is AuthMode.SIGV4  # type: ignore[arg-type]


def test_mode_none_lets_everything_through() -> None:
    auth = Authenticator(AuthMode.NONE, lambda: None)
    assert auth.check(b"POST", b"/endpoints/x/invocations", [], b"") is None
    assert auth.check(b"POST", b"/x", [(b"authorization", b"\xff junk")], b"z") is None


@pytest.mark.parametrize("tamper", ["body", "path", "query", "method", "header", "host"])
def test_tampering_with_anything_signed_is_detected(tamper: str) -> None:
    (method, target, headers, body), at = signed(URL + "?a=1")
    if tamper == "body":
        body = body.replace(b"5.1", b"9.9")
    elif tamper == "path":
        target = target.replace(b"iris", b"wine")
    elif tamper == "query":
        target = target.replace(b"a=1", b"a=2")
    elif tamper == "method":
        method = b"PUT"
    elif tamper == "header":
        headers = replace(headers, b"content-type", b"text/csv")
    else:
        headers = replace(headers, b"host", b"evil.example:8080")
    expect(sigv4(at).check(method, target, headers, body), 403, "InvalidSignatureException")


def test_unsigned_headers_may_change_and_be_added() -> None:
    (method, target, headers, body), at = signed()
    headers = [*headers, (b"user-agent", b"curl/8"), (b"x-amzn-trace-id", b"Root=1")]
    assert sigv4(at).check(method, target, headers, body) is None


def test_a_signed_header_that_is_not_sent_is_incomplete() -> None:
    (method, target, headers, body), at = signed()
    missing = [(n, v) for n, v in headers if n != b"content-type"]
    err = expect(sigv4(at).check(method, target, missing, body), 400,
                 "IncompleteSignatureException")
    assert "'content-type'" in err.message


def test_host_must_be_signed() -> None:
    (method, target, headers, body), at = signed()
    auth = dict(headers)[b"authorization"].replace(b"content-type;host;", b"content-type;")
    err = expect(sigv4(at).check(method, target, replace(headers, b"authorization", auth), body),
                 400, "IncompleteSignatureException")
    assert "Host header must be signed" in err.message


def test_clock_skew_window() -> None:
    (method, target, headers, body), at = signed()
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(at))

    def at_offset(seconds: float) -> RuntimeServiceError | None:
        return sigv4(at + seconds).check(method, target, headers, body)

    assert at_offset(300) is None and at_offset(-300) is None and at_offset(0) is None
    late = expect(at_offset(360), 403, "InvalidSignatureException")
    assert late.message.startswith(
        f"Signature expired: {stamp} is now earlier than "
        f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(at + 60))} "
        f"({time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(at + 360))} - 5 min.)")
    early = expect(at_offset(-360), 403, "InvalidSignatureException")
    assert early.message.startswith(
        f"Signature not yet current: {stamp} is still later than "
        f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(at - 60))} "
        f"({time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(at - 360))} + 5 min.)")
    expect(at_offset(300.5), 403, "InvalidSignatureException")
    tight = sigv4(at + 61, max_skew_s=60).check(method, target, headers, body)
    assert expect(tight, 403, "InvalidSignatureException").message.count("1 min.") == 1


def test_region_restriction_and_service_scope() -> None:
    (method, target, headers, body), at = signed(region="eu-west-1")
    allowed = frozenset({"us-east-1", "us-west-2"})
    err = expect(sigv4(at, regions=allowed).check(method, target, headers, body), 403,
                 "InvalidSignatureException")
    assert "'eu-west-1'" in err.message and "us-east-1, us-west-2" in err.message
    assert sigv4(at, regions=frozenset({"eu-west-1"})).check(method, target, headers,
                                                               body) is None
    # Any region by default (None or empty), even one AWS does not have.
    (method, target, headers, body), at = signed(region="local")
    assert sigv4(at).check(method, target, headers, body) is None
    assert sigv4(at, regions=frozenset()).check(method, target, headers, body) is None
    (method, target, headers, body), at = signed(service="execute-api")
    err = expect(sigv4(at).check(method, target, headers, body), 403,
                 "InvalidSignatureException")
    assert "'sagemaker'" in err.message


def test_unsigned_payload_is_accepted_and_a_wrong_content_hash_is_not() -> None:
    unsigned = (("Content-Type", "application/json"), ("X-Amz-Content-SHA256", "UNSIGNED-PAYLOAD"))
    (method, target, headers, body), at = signed(headers=unsigned)
    assert sigv4(at).check(method, target, headers, body) is None
    # The body is then protected by TLS only, as on AWS.
    assert sigv4(at).check(method, target, headers, b"other") is None

    right = hashlib.sha256(BODY).hexdigest()
    (method, target, headers, body), at = signed(
        headers=(("Content-Type", "application/json"), ("X-Amz-Content-SHA256", right)))
    assert sigv4(at).check(method, target, headers, body) is None
    err = expect(sigv4(at).check(method, target, headers, b"other"), 403,
                 "InvalidSignatureException")
    assert "X-Amz-Content-SHA256" in err.message

    wrong = hashlib.sha256(b"other").hexdigest()
    (method, target, headers, body), at = signed(
        headers=(("Content-Type", "application/json"), ("X-Amz-Content-SHA256", wrong)))
    expect(sigv4(at).check(method, target, headers, body), 403, "InvalidSignatureException")


def test_query_strings_and_encoded_paths() -> None:
    for url in (URL + "?b=2&a=1&a=0", URL + "?flag", URL + "?x=%20y%2Fz",
                "http://gw.example:8080/endpoints/my%20end%3Apoint/invocations",
                "http://gw.example:8080/endpoints/%C3%BCber/async-invocations",
                "http://gw.example/endpoints/iris/invocations"):
        (method, target, headers, body), at = signed(url)
        assert sigv4(at).check(method, target, headers, body) is None, url
    # The encoding is signed, not just what it decodes to.
    (method, target, headers, body), at = signed(URL + "?x=%20y")
    expect(sigv4(at).check(method, target.replace(b"%20", b"+"), headers, body), 403,
           "InvalidSignatureException")
    (method, target, headers, body), at = signed(
        "http://gw.example:8080/endpoints/my%20end/invocations")
    expect(sigv4(at).check(method, target.replace(b"%20", b" "), headers, body), 403,
           "InvalidSignatureException")


def test_dot_segments_are_refused_rather_than_normalised() -> None:
    (method, _, headers, body), at = signed()
    for odd in (b"/endpoints/x/../iris/invocations", b"//endpoints/iris/invocations",
                b"/endpoints/./iris/invocations", b"endpoints/iris/invocations"):
        err = expect(sigv4(at).check(method, odd, headers, body), 403,
                     "InvalidSignatureException")
        assert "canonical form" in err.message


def test_header_name_case_and_repeated_headers() -> None:
    request = AWSRequest(method="POST", url=URL, data=BODY)
    request.headers["Content-Type"] = "application/json"
    request.headers["X-Amzn-SageMaker-Custom-Attributes"] = "a=1"
    request.headers["X-Amzn-SageMaker-Custom-Attributes"] = "b  =  2"
    SigV4Auth(Credentials(AK, SK), "sagemaker", "us-east-1").add_auth(request)
    at = signed_at(request)
    parts = urlsplit(URL)
    mixed: Headers = [(b"Host", parts.netloc.encode())]
    mixed += [(n.encode(), v.encode()) for n, v in request.headers.items()]
    assert len([n for n, _ in mixed if n == b"X-Amzn-SageMaker-Custom-Attributes"]) == 2
    assert sigv4(at).check(b"POST", parts.path.encode(), mixed, BODY) is None
    lower = [(n.lower(), v) for n, v in mixed]
    assert sigv4(at).check(b"POST", parts.path.encode(), lower, BODY) is None
    # The order of repeated values is signed.
    reordered = [h for h in lower if h[0] != b"x-amzn-sagemaker-custom-attributes"]
    reordered += [(b"x-amzn-sagemaker-custom-attributes", b"b  =  2"),
                  (b"x-amzn-sagemaker-custom-attributes", b"a=1")]
    expect(sigv4(at).check(b"POST", parts.path.encode(), reordered, BODY), 403,
           "InvalidSignatureException")


def test_date_header_instead_of_x_amz_date() -> None:
    request = AWSRequest(method="POST", url=URL, data=BODY)
    request.headers["Date"] = "Thu, 01 Jan 2026 00:00:00 GMT"
    SigV4Auth(Credentials(AK, SK), "sagemaker", "us-east-1").add_auth(request)
    assert "X-Amz-Date" not in request.headers
    method, target, headers, body = wire("POST", URL, request.headers.items(), BODY)
    assert sigv4(signed_at(request)).check(method, target, headers, body) is None


def test_scope_date_must_match_the_request_date() -> None:
    (method, target, headers, body), at = signed()
    day = time.strftime("%Y%m%d", time.gmtime(at))
    other = time.strftime("%Y%m%d", time.gmtime(at - 86400))
    auth = dict(headers)[b"authorization"].replace(f"/{day}/".encode(), f"/{other}/".encode())
    err = expect(sigv4(at).check(method, target, replace(headers, b"authorization", auth), body),
                 403, "InvalidSignatureException")
    assert "Date in Credential scope does not match" in err.message


def test_missing_authorization_or_date() -> None:
    (method, target, headers, body), at = signed()
    bare = [(n, v) for n, v in headers if n != b"authorization"]
    err = expect(sigv4(at).check(method, target, bare, body), 403,
                 "MissingAuthenticationTokenException")
    assert err.message.startswith("Missing Authentication Token")
    assert "SigV4" in err.message and "boto3" in err.message
    undated = [(n, v) for n, v in headers if n != b"x-amz-date"]
    err = expect(sigv4(at).check(method, target, undated, body), 400,
                 "IncompleteSignatureException")
    assert "X-Amz-Date" in err.message


def test_signing_keys_are_cached() -> None:
    auth = sigv4(0)
    for _ in range(3):
        (method, target, headers, body), at = signed()
        auth.clock = lambda at=at: at  # type: ignore[misc]
        assert auth.check(method, target, headers, body) is None
    info = auth._signing_key.cache_info()
    assert info.misses == 1 and info.hits == 2


# -- requests captured from a real boto3 client


class _Raw(io.BytesIO):
    """What botocore reads a response body from (urllib3's response, in real life)."""

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self.getvalue()


@pytest.fixture
def captured() -> Iterator[tuple[Any, list[Any], list[Any]]]:
    """A sagemaker-runtime client, the requests it sends, and the replies to give it."""
    sent: list[Any] = []
    replies: list[Any] = []

    def before_send(request: Any, **_: Any) -> Any:
        sent.append(request)
        if replies:
            status, headers, body = replies.pop(0)
            return AWSResponse(request.url, status, {k.decode(): v.decode() for k, v in headers},
                               _Raw(body))
        return AWSResponse(request.url, 200, {"content-type": "application/json",
                                              "content-length": "2"}, _Raw(b"{}"))

    session = boto3.session.Session(aws_access_key_id=AK, aws_secret_access_key=SK,
                                    region_name="us-west-2")
    client = session.client("sagemaker-runtime", endpoint_url="http://127.0.0.1:8080",
                            config=Config(retries={"max_attempts": 1, "mode": "standard"}))
    client.meta.events.register("before-send.sagemaker-runtime.*", before_send)
    yield client, sent, replies
    client.close()


def _check_captured(request: Any, **kwargs: Any) -> RuntimeServiceError | None:
    method, target, headers, body = wire(request.method, request.url, request.headers.items(),
                                         request.body)
    return sigv4(signed_at(request), **kwargs).check(method, target, headers, body)


def test_boto3_invoke_endpoint_verifies(captured: tuple[Any, list[Any], list[Any]]) -> None:
    client, sent, _ = captured
    client.invoke_endpoint(EndpointName="iris", Body=BODY, ContentType="application/json",
                           Accept="application/json", CustomAttributes="trace=1",
                           TargetVariant="blue", InferenceId="abc-1")
    client.invoke_endpoint(EndpointName="my end:point/ü", Body=b"1,2,3", ContentType="text/csv")
    client.invoke_endpoint_async(EndpointName="iris", InputLocation="s3://bucket/in/x.json",
                                 InferenceId="inf-7", RequestTTLSeconds=600)
    assert len(sent) == 3
    assert b"/endpoints/my%20end%3Apoint%2F%C3%BC/invocations" in sent[1].url.encode()
    assert sent[2].url.endswith("/endpoints/iris/async-invocations")
    for request in sent:
        assert _check_captured(request) is None, request.url
        assert _check_captured(request, regions=frozenset({"us-west-2"})) is None
    tampered = sent[0]
    tampered.headers["X-Amzn-SageMaker-Target-Variant"] = "green"
    expect(_check_captured(tampered), 403, "InvalidSignatureException")


def test_boto3_raises_the_error_codes_the_gateway_renders(
        captured: tuple[Any, list[Any], list[Any]]) -> None:
    client, sent, replies = captured
    client.invoke_endpoint(EndpointName="iris", Body=BODY, ContentType="application/json")
    (method, target, headers, body) = wire(sent[0].method, sent[0].url,
                                           sent[0].headers.items(), sent[0].body)
    at = signed_at(sent[0])
    errors = [
        sigv4(at + 3600).check(method, target, headers, body),
        sigv4(at, creds(**{AK2: SK2})).check(method, target, headers, body),
        Authenticator(AuthMode.TOKEN, lambda: creds(), clock=lambda: at).check(
            method, target, [], body),
    ]
    for err in errors:
        assert err is not None
        replies.append(render_error(err))
        with pytest.raises(ClientError) as raised:
            client.invoke_endpoint(EndpointName="iris", Body=BODY)
        assert raised.value.response["Error"]["Code"] == err.code
        assert raised.value.response["Error"]["Message"] == err.message
        assert raised.value.response["ResponseMetadata"]["HTTPStatusCode"] == err.status


# -- junk never raises and is never echoed

JUNK_MARK = "Zq9SECRETJUNKq"


def _junk_authorizations(rng: random.Random) -> Iterator[bytes]:
    sig = "0" * 64
    crafted = [
        "", " ", "AWS4-HMAC-SHA256", "AWS4-HMAC-SHA256 ", "AWS4-HMAC-SHA256 ,,,",
        f"AWS4-HMAC-SHA256 Credential={JUNK_MARK}", "Basic " + JUNK_MARK, "Bearer " + JUNK_MARK,
        f"AWS4-HMAC-SHA256 Credential={AK}/2026/us-east-1/sagemaker/aws4_request, "
        f"SignedHeaders=host, Signature={JUNK_MARK}",
        f"AWS4-HMAC-SHA256 Credential={AK}/20261206/{JUNK_MARK}!/sagemaker/aws4_request, "
        f"SignedHeaders=host, Signature={sig}",
        f"AWS4-HMAC-SHA256 Credential={AK}/20261206/us-east-1/sagemaker/aws4_request, "
        f"SignedHeaders=host;{JUNK_MARK.upper()}, Signature={sig}",
        f"AWS4-HMAC-SHA256 Credential={AK}/20261206/us-east-1/sagemaker/aws4_request, "
        f"SignedHeaders=host;x-{JUNK_MARK.lower()}, Signature={sig}",
        f"AWS4-HMAC-SHA256 Credential={AK}/20261206/us-east-1/sagemaker/aws4_request, "
        f"SignedHeaders=host;host, Signature={sig}",
        f"AWS4-HMAC-SHA256 Credential={JUNK_MARK}/20261206/us-east-1/sagemaker/aws4_request, "
        f"SignedHeaders=host, Signature={sig}",
        f"AWS4-HMAC-SHA256 Credential={AK}/20261206/us-east-1/sagemaker/aws4_request, "
        f"SignedHeaders={';'.join(f'h{i}' for i in range(500))};host, Signature={sig}",
        "AWS4-HMAC-SHA256 Credential=/////, SignedHeaders=;;, Signature=",
        "AWS4-HMAC-SHA256 Credential==,SignedHeaders==,Signature==,Signature=",
    ]
    for text in crafted:
        yield text.encode()
    alphabet = "AWS4-HMAC-SHA256 Credential=/SignedHeaders;Signature=,host\x00\xff\t é"
    for _ in range(400):
        length = rng.randrange(0, 120)
        yield "".join(rng.choice(alphabet) for _ in range(length)).encode("utf-8")
        yield bytes(rng.randrange(256) for _ in range(length))


@pytest.mark.parametrize("mode", [AuthMode.SIGV4, AuthMode.TOKEN])
def test_junk_never_raises_nor_echoes(mode: AuthMode, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="kubeinfer")
    (method, target, _, body), at = signed()
    rng = random.Random(20261206)
    auth = Authenticator(mode, lambda: CallerCredentials({AK: SK}, (token_digest(b"t0k"),)),
                         clock=lambda: at, regions=frozenset({"us-east-1"}))
    dates = [b"20261206T042500Z", b"00000000T000000Z", b"99991399T256199Z", b"\xff", b"",
             b"Mon, 99 Foo 0000 99:99:99 GMT", b"Thu, 01 Jan 9999 00:00:00 +2400"]
    for i, junk in enumerate(_junk_authorizations(rng)):
        date_name = b"x-amz-date" if i % 2 else b"date"
        trial: Headers = [(b"host", b"gw"), (b"authorization", junk),
                          (date_name, dates[i % len(dates)]),
                          (b"x-amz-content-sha256", junk[:64])]
        odd_target = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 30)))
        for tgt in (target, b"/" + odd_target):
            err = auth.check(method, tgt, trial, JUNK_MARK.encode() + body)
            assert isinstance(err, RuntimeServiceError), junk
            assert err.status in (400, 401, 403), (err, junk)
            rendered = render_error(err)[2].decode()
            assert JUNK_MARK.lower() not in rendered.lower(), (err, junk)
            if len(junk) >= 12:
                assert junk.decode("latin-1") not in err.message
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_mutated_signed_requests_never_raise_nor_pass(caplog: pytest.LogCaptureFixture) -> None:
    (method, target, headers, body), at = signed(URL + "?a=1")
    original = dict(headers)[b"authorization"]
    auth = sigv4(at)
    rng = random.Random(7)
    for _ in range(1500):
        mutated = bytearray(original)
        position = rng.randrange(len(mutated))
        action = rng.randrange(3)
        if action == 0:
            mutated[position] = rng.randrange(256)
        elif action == 1:
            del mutated[position]
        else:
            mutated.insert(position, rng.choice(b" ,;=/\x00\xffaZ0"))
        err = auth.check(method if rng.random() < 0.9 else bytes([rng.randrange(256)]), target,
                         replace(headers, b"authorization", bytes(mutated)), body)
        if err is None:
            # Only whitespace around the separators may change without changing the meaning.
            assert bytes(mutated).split() == original.split() or \
                b"".join(bytes(mutated).split()) == b"".join(original.split()), bytes(mutated)
        else:
            assert err.status in (400, 403) and err.code != "InternalFailure"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# -- bearer tokens


def _token_auth(*tokens: bytes) -> Authenticator:
    loaded = CallerCredentials({}, tuple(token_digest(t) for t in tokens))
    return Authenticator(AuthMode.TOKEN, lambda: loaded)


def test_token_good_bad_missing_and_whitespace() -> None:
    auth = _token_auth(b"Qz-1", b"Qz-2-rotated")
    for value in (b"Bearer Qz-1", b"bearer Qz-2-rotated", b"  Bearer   Qz-1  ",
                  b"BEARER\tQz-1"):
        assert auth.check(b"POST", b"/", [(b"authorization", value)], b"") is None, value
    for value in (b"Bearer Qz-3", b"Bearer Qz-1x", b"Bearer Qz", b"Bearer Qz-1 Qz-2",
                  b"Bearer qz-1"):
        err = expect(auth.check(b"POST", b"/", [(b"Authorization", value)], b""), 403,
                     "AccessDeniedException")
        assert "Qz" not in err.message
    for headers in ([], [(b"authorization", b"Bearer")], [(b"authorization", b"Bearer   ")],
                    [(b"authorization", b"Basic dXNlcjpwdw==")], [(b"authorization", b"")]):
        err = expect(auth.check(b"POST", b"/", headers, b""), 401,
                     "MissingAuthenticationTokenException")
        assert (b"www-authenticate", b"Bearer") in render_error(err)[1]
        assert "Authorization: Bearer" in err.message
    none = Authenticator(AuthMode.TOKEN, lambda: CallerCredentials({AK: SK}, ()))
    expect(none.check(b"POST", b"/", [(b"authorization", b"Bearer x")], b""), 403,
           "AccessDeniedException")


def test_sigv4_endpoint_refuses_a_bearer_token_and_says_so() -> None:
    err = expect(sigv4(0).check(b"POST", b"/endpoints/iris/invocations",
                                [(b"authorization", b"Bearer abc")], b""),
                 400, "IncompleteSignatureException")
    assert "bearer token" in err.message and "SigV4" in err.message


def test_error_bodies_are_aws_json() -> None:
    (method, target, headers, body), at = signed(secret=SK2)
    err = sigv4(at).check(method, target, headers, body)
    assert err is not None
    status, out_headers, out_body = render_error(err)
    assert status == 403
    assert dict(out_headers)[b"x-amzn-errortype"] == b"InvalidSignatureException:"
    payload = orjson.loads(out_body)
    assert payload["ErrorCode"] == "InvalidSignatureException"
    assert SK not in out_body.decode() and SK2 not in out_body.decode()
