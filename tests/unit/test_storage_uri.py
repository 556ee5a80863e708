"""Model URI parsing (pure) and local-file fetching."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from kubeinfer_runtime.contract import S3Settings
from kubeinfer_runtime.storage.fetch import ModelNotFoundError, cache_path, fetch_model
from kubeinfer_runtime.storage.uri import (
    FileLocation,
    InvalidModelUri,
    S3Location,
    parse_model_uri,
)


@pytest.mark.parametrize(("uri", "loc"), [
    ("file:///abs/model.onnx", FileLocation("/abs/model.onnx")),
    ("file://models/iris.onnx", FileLocation("/models/models/iris.onnx")),
    ("file://iris.onnx", FileLocation("/models/iris.onnx")),
    ("file:///with%20space/m.onnx", FileLocation("/with space/m.onnx")),
    ("file:///a//b/./m.onnx", FileLocation("/a/b/m.onnx")),
    ("s3://bucket/path/to/model.onnx", S3Location("bucket", "path/to/model.onnx")),
    ("s3://bucket//double/model.onnx", S3Location("bucket", "double/model.onnx")),
])
def test_parse(uri: str, loc: object) -> None:
    assert parse_model_uri(uri, "/models") == loc


def test_relative_file_uris_use_the_base_dir() -> None:
    assert parse_model_uri("file://models/x.onnx", "/srv") == FileLocation("/srv/models/x.onnx")


@pytest.mark.parametrize(("uri", "msg"), [
    ("http://example.com/m.onnx", "unsupported scheme 'http'"),
    ("/plain/path.onnx", "unsupported scheme '\\(none\\)'"),
    ("s3://bucket", "must look like s3://bucket/path"),
    ("s3:///key.onnx", "must look like s3://bucket/path"),
    ("s3://bucket/prefix/", "names a prefix, not an object"),
    ("s3://bucket/a/../../secret", "contains '..'"),
    ("file://../etc/passwd", "contains '..'"),
    ("file:///models/../etc/passwd", "contains '..'"),
    ("file://%2E%2E/etc/passwd", "contains '..'"),
    ("file:///", "names no file"),
])
def test_bad_uris_are_refused_with_the_fix(uri: str, msg: str) -> None:
    with pytest.raises(InvalidModelUri, match=msg) as e:
        parse_model_uri(uri, "/models")
    assert e.value.status == 400 and uri in e.value.message


def test_fetch_local_file_hashes_it_in_place(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x" * 3_000_000)
    got = fetch_model(f"file://{model}", base_dir="/", cache_dir=str(tmp_path / "cache"),
                      s3=S3Settings())
    assert got.path == model and got.size == 3_000_000
    assert got.sha256 == hashlib.sha256(model.read_bytes()).hexdigest()
    assert not (tmp_path / "cache").exists()  # local files are not copied


def test_fetch_relative_file(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "m.onnx").write_bytes(b"abc")
    got = fetch_model("file://models/m.onnx", base_dir=str(tmp_path), cache_dir="/nonexistent",
                      s3=S3Settings())
    assert got.path == tmp_path / "models" / "m.onnx"


def test_fetch_missing_or_directory_names_the_path_and_uri(tmp_path: Path) -> None:
    missing = tmp_path / "nope.onnx"
    with pytest.raises(ModelNotFoundError, match="does not exist") as e:
        fetch_model(f"file://{missing}", base_dir="/", cache_dir=str(tmp_path), s3=S3Settings())
    assert str(missing) in e.value.message and e.value.status == 404
    with pytest.raises(ModelNotFoundError, match="is not a file"):
        fetch_model(f"file://{tmp_path}", base_dir="/", cache_dir=str(tmp_path), s3=S3Settings())


def test_cache_path_is_one_folder_per_uri() -> None:
    a = cache_path(Path("/c"), S3Location("b", "x/model.onnx"))
    b = cache_path(Path("/c"), S3Location("b", "y/model.onnx"))
    assert a.name == b.name == "model.onnx" and a.parent != b.parent
    assert a.parent.parent == Path("/c")
