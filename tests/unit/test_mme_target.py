"""TargetModel names: only plain relative paths under the prefix get through."""

from __future__ import annotations

import pytest

from kubeinfer_runtime.errors import ValidationError
from kubeinfer_runtime.storage.target import InvalidTargetModel, check_target, parse_prefix
from kubeinfer_runtime.storage.uri import FileLocation, S3Location


@pytest.mark.parametrize("name", ["model.onnx", "tenant-42/model.onnx", "a/b/c_d-1.2+x=y@z"])
def test_plain_relative_names_resolve_under_the_prefix(name: str) -> None:
    assert check_target(name) == name
    s3 = parse_prefix("s3://bucket/models")
    assert s3.locate(name) == S3Location("bucket", "models/" + name)
    f = parse_prefix("file:///srv/models/")
    assert f.locate(name) == FileLocation("/srv/models/" + name)


@pytest.mark.parametrize("name", [
    "", "../secret.onnx", "tenant/../../secret.onnx", "a/./b.onnx", "a//b.onnx", "/etc/passwd",
    "%2e%2e/secret.onnx", "..%2fsecret.onnx", "s3://other-bucket/m.onnx", "file:///etc/passwd",
    "a\\..\\b", "m.onnx?x=1", "m.onnx#frag", "a b.onnx", "m\x00.onnx", "a/..", "x" * 1025,
])
def test_escapes_and_url_tricks_are_refused(name: str) -> None:
    with pytest.raises(InvalidTargetModel) as info:
        check_target(name)
    assert info.value.status == 400 and info.value.code == "ValidationError"


def test_prefixes() -> None:
    assert parse_prefix("s3://b").root == ""
    assert parse_prefix("s3://b/p/").root == "p/"
    assert parse_prefix("file://models/", "/srv/kubeinfer").root == "/srv/kubeinfer/models/"
    for bad in ("http://x/", "s3:///p/", "file:///a/../b/"):
        with pytest.raises(ValidationError):
            parse_prefix(bad)
