"""TargetModel names: only plain relative paths under the prefix get through."""

from __future__ import annotations

from pathlib import Path

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
    # Bytes 0x80-0x9f of a header, decoded as latin-1: C1 control characters.
    "m\x85.onnx", "tenant\x9b/m.onnx", "\x80m.onnx",
])
def test_escapes_and_url_tricks_are_refused(name: str) -> None:
    with pytest.raises(InvalidTargetModel) as info:
        check_target(name)
    assert info.value.status == 400 and info.value.code == "ValidationError"


def test_latin_1_letters_after_the_c1_controls_are_names() -> None:
    assert check_target("caf\u00e9/m.onnx") == "caf\u00e9/m.onnx"  # 0xe9 in a header


def test_prefixes() -> None:
    assert parse_prefix("s3://b").root == ""
    assert parse_prefix("s3://b/p/").root == "p/"
    assert parse_prefix("file://models/", "/srv/kubeinfer").root == "/srv/kubeinfer/models/"
    for bad in ("http://x/", "s3:///p/", "file:///a/../b/"):
        with pytest.raises(ValidationError):
            parse_prefix(bad)


def test_a_symlink_inside_the_prefix_cannot_reach_outside(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from kubeinfer_runtime.contract import ModelServerSettings
    from kubeinfer_runtime.metrics import MultiModelMetrics
    from kubeinfer_runtime.server.multimodel import MultiModelStore

    prefix = tmp_path / "models"
    (prefix / "tenant").mkdir(parents=True)
    (prefix / "tenant" / "ok.onnx").write_bytes(b"1234")
    (tmp_path / "secret.onnx").write_bytes(b"secret")
    (prefix / "tenant" / "escape.onnx").symlink_to(tmp_path / "secret.onnx")
    settings = ModelServerSettings(multi_model_prefix=f"file://{prefix}/",
                                   model_cache_dir=str(tmp_path / "cache"))
    with ThreadPoolExecutor(1) as pool:
        store = MultiModelStore(settings, MultiModelMetrics("t", "t"), pool)
        assert store._stat("tenant/ok.onnx") == 4
        with pytest.raises(InvalidTargetModel, match="resolves outside the multi-model prefix"):
            store._stat("tenant/escape.onnx")
        with pytest.raises(ValidationError) as info:
            store._stat("tenant/absent.onnx")
        assert info.value.status == 404


def test_access_denied_on_s3_says_it_may_be_a_missing_model(tmp_path: Path) -> None:
    """On AWS a missing object answers 403 AccessDenied when the role lacks s3:ListBucket
    (SeaweedFS answers 404): the 503 says so rather than only blaming credentials."""
    from concurrent.futures import ThreadPoolExecutor

    from minio.error import S3Error

    from kubeinfer_runtime.contract import ModelServerSettings
    from kubeinfer_runtime.metrics import MultiModelMetrics
    from kubeinfer_runtime.server.multimodel import MultiModelStore
    from kubeinfer_runtime.storage.fetch import StorageUnavailable

    class Denying:
        def stat_object(self, bucket: str, key: str) -> None:
            raise S3Error(None, "AccessDenied", "Access Denied", key, "req", "host")  # type: ignore[arg-type]

    settings = ModelServerSettings(multi_model_prefix="s3://bucket/models/",
                                   model_cache_dir=str(tmp_path / "cache"))
    with ThreadPoolExecutor(1) as pool:
        store = MultiModelStore(settings, MultiModelMetrics("t", "t"), pool)
        store._client = Denying()  # type: ignore[assignment]
        with pytest.raises(StorageUnavailable, match="s3:ListBucket"):
            store._stat("tenant/absent.onnx")
