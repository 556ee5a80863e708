"""Error rendering: SageMaker-style body and the x-amzn-ErrorType header boto3 reads."""

from __future__ import annotations

import orjson
import pytest

from kubeinfer_runtime import errors


@pytest.mark.parametrize(("err", "status", "code"), [
    (errors.ValidationError("m"), 400, "ValidationError"),
    (errors.PayloadTooLarge("m"), 413, "ValidationError"),
    (errors.NotFound("m"), 404, "ValidationError"),
    (errors.ModelError("m"), 424, "ModelError"),
    (errors.Throttled("m"), 429, "ThrottlingException"),
    (errors.NotReady("m"), 503, "ServiceUnavailable"),
    (errors.Internal("m"), 500, "InternalFailure"),
    (errors.InsufficientStorage("m"), 507, "InsufficientStorage"),
])
def test_each_error_renders_its_status_code_and_header(
        err: errors.RuntimeServiceError, status: int, code: str) -> None:
    got_status, headers, body = errors.render_error(err)
    assert got_status == status
    hdrs = dict(headers)
    assert hdrs[b"x-amzn-errortype"] == f"{code}:".encode()
    assert hdrs[b"content-type"] == b"application/json"
    assert hdrs[b"content-length"] == str(len(body)).encode()
    assert orjson.loads(body) == {"ErrorCode": code, "Message": "m", "message": "m"}
    assert isinstance(err, errors.RuntimeServiceError)


def test_message_is_the_exception_text_and_survives_unicode() -> None:
    err = errors.ValidationError('Input "X" expects µ-units')
    assert str(err) == 'Input "X" expects µ-units'
    _, _, body = errors.render_error(err)
    assert orjson.loads(body)["Message"] == 'Input "X" expects µ-units'


def test_custom_status_on_a_validation_error() -> None:
    status, headers, _ = errors.render_error(errors.ValidationError("no", status=405))
    assert status == 405 and dict(headers)[b"x-amzn-errortype"] == b"ValidationError:"


def test_base_class_takes_any_status() -> None:
    err = errors.RuntimeServiceError(418, "Teapot", "short and stout")
    assert errors.render_error(err)[0] == 418
    assert "Teapot" in repr(err)


def test_extra_headers_are_appended_and_default_to_none() -> None:
    plain = errors.NotReady("m")
    assert plain.headers == []
    assert len(errors.render_error(plain)[1]) == 3
    err = errors.RuntimeServiceError(401, "MissingAuthenticationTokenException", "sign it",
                                     headers=[(b"www-authenticate", b"Bearer")])
    status, headers, body = errors.render_error(err)
    assert status == 401
    assert headers[-1] == (b"www-authenticate", b"Bearer")
    assert dict(headers)[b"x-amzn-errortype"] == b"MissingAuthenticationTokenException:"
    assert orjson.loads(body)["Message"] == "sign it"
    # Each error owns its list: rendering twice does not grow it, nor another error's.
    errors.render_error(err)
    assert err.headers == [(b"www-authenticate", b"Bearer")]
    assert errors.NotReady("n").headers == []
