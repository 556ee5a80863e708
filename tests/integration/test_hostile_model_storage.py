"""A hostile (or wrong) object store and model URI against a real SeaweedFS S3 server.

* A single-model server refuses an object over ``KUBEINFER_MAX_MODEL_BYTES`` from its
  announced length: nothing is written to its disk, ``/ping`` names the bound, the
  process stays up (no crash loop that fills the node's disk).
* A multi-model server never writes more than its disk cache made room for: an object
  replaced by a bigger one between the size check and the download is refused (retry).
* The disk cache is no confused deputy: bytes another process (or an earlier fetch)
  downloaded with credentials that may read them are never served to a reader whose
  own credentials may not.
"""

from __future__ import annotations

import asyncio
import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from examples.build_multimodel_models import numbered_model_bytes

from kubeinfer_runtime.contract import ModelServerSettings
from kubeinfer_runtime.metrics import MultiModelMetrics
from kubeinfer_runtime.server.multimodel import MultiModelStore
from kubeinfer_runtime.storage.fetch import (
    ModelChanged,
    ModelTooLarge,
    StorageUnavailable,
    fetch_model,
)
from tests.support.ports import wait_until
from tests.support.procs import start_runtime
from tests.support.s3 import ACCESS_KEY, SECRET_KEY, S3Server

BUCKET = "hostile"


def _put(s3: S3Server, key: str, data: bytes) -> str:
    client = s3.minio()
    if not client.bucket_exists(BUCKET):
        client.make_bucket(BUCKET)
    client.put_object(BUCKET, key, io.BytesIO(data), len(data))
    return f"s3://{BUCKET}/{key}"


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def test_a_model_over_the_bound_is_refused_before_a_byte_is_written(
        s3_server: S3Server, tmp_path: Path) -> None:
    model = numbered_model_bytes(3, 2 << 20)  # a valid ONNX model of about 2 MiB
    uri = _put(s3_server, "big/model.onnx", model)
    cache = tmp_path / "cache"
    proc = start_runtime("model-server", {
        "KUBEINFER_MODEL_URI": uri, "KUBEINFER_MODEL_NAME": "primary",
        "KUBEINFER_MODEL_CACHE_DIR": str(cache), "KUBEINFER_MAX_MODEL_BYTES": str(1 << 20),
        **s3_server.env()}, tmp_path / "logs", expect_ready=False)
    try:
        wait_until(lambda: "failed to load" in httpx.get(proc.url + "/ping").text, 30,
                   "the model load to fail")
        r = httpx.get(proc.url + "/ping")
        assert r.status_code == 503
        message = r.json()["Message"]
        assert f"Model object {uri} is {len(model)} bytes, over the {1 << 20} bytes" in message
        assert "KUBEINFER_MAX_MODEL_BYTES" in message
        assert _files(cache) == []  # not the model, not a partial download
        assert proc.proc.poll() is None and \
            httpx.get(proc.url + "/v2/health/live").status_code == 200
    finally:
        proc.stop()


def _settings(s3: S3Server, cache: Path, **extra: object) -> ModelServerSettings:
    values: dict[str, object] = {
        "multi_model_prefix": f"s3://{BUCKET}/mme/", "model_cache_dir": str(cache),
        "s3_endpoint_url": s3.endpoint_url, "s3_region": "us-east-1",
        "s3_access_key": ACCESS_KEY, "s3_secret_key": SECRET_KEY, **extra}
    return ModelServerSettings.model_validate(values)


def test_a_multi_model_download_never_exceeds_what_was_made_room_for(
        s3_server: S3Server, tmp_path: Path) -> None:
    name = "tenant-1/model.onnx"
    _put(s3_server, f"mme/{name}", numbered_model_bytes(1, 1024))
    _put(s3_server, "mme/huge/model.onnx", numbered_model_bytes(2, 64 << 10))
    settings = _settings(s3_server, tmp_path / "cache", max_model_bytes=32 << 10)

    async def scenario() -> None:
        with ThreadPoolExecutor(2) as pool:
            store = MultiModelStore(settings, MultiModelMetrics("hostile", "mme"), pool)
            # Over KUBEINFER_MAX_MODEL_BYTES: refused from the object's size (507).
            with pytest.raises(ModelTooLarge, match="KUBEINFER_MAX_MODEL_BYTES"):
                await store.size("huge/model.onnx")
            reserved = await store.size(name)
            # The object is replaced by a bigger one after the cache made room for it.
            _put(s3_server, f"mme/{name}", numbered_model_bytes(1, 16 << 10))
            with pytest.raises(ModelChanged, match=f"was {reserved} bytes when the disk "
                                                   "cache made room for it"):
                await store.load(name, reserved)
            assert store.disk.used_bytes == 0
            assert _files(store.disk.root) == []
            # The next try sizes it again and loads it.
            model = await store.load(name, await store.size(name))
            assert model.meta.inputs[0].name == "x"
            store.disk.close()

    asyncio.run(scenario())


def test_cached_bytes_are_never_served_to_a_reader_without_access(
        s3_server: S3Server, tmp_path: Path) -> None:
    uri = _put(s3_server, "private/model.onnx", numbered_model_bytes(5, 1024))
    cache = tmp_path / "cache"
    allowed = _settings(s3_server, cache).s3()
    fetched = fetch_model(uri, base_dir="/", cache_dir=str(cache), s3=allowed)
    assert fetched.path.is_file() and fetched.path.is_relative_to(cache)
    denied = allowed.model_copy(update={"secret_key": "not-the-secret"})
    with pytest.raises(StorageUnavailable, match="cannot be read") as e:
        fetch_model(uri, base_dir="/", cache_dir=str(cache), s3=denied)
    assert "not-the-secret" not in e.value.message and SECRET_KEY not in e.value.message

    # Multi-model: one server's processes share the cache folder, each downloads with
    # its own credentials and serves only what it downloaded itself.
    _put(s3_server, "mme/private/model.onnx", numbered_model_bytes(6, 1024))

    async def scenario() -> None:
        with ThreadPoolExecutor(2) as pool:
            reader = MultiModelStore(_settings(s3_server, cache),
                                     MultiModelMetrics("hostile", "a"), pool)
            await reader.load("private/model.onnx", await reader.size("private/model.onnx"))
            other = MultiModelStore(_settings(s3_server, cache, s3_secret_key="wrong"),
                                    MultiModelMetrics("hostile", "b"), pool)
            with pytest.raises(StorageUnavailable, match="cannot be read"):
                await other.size("private/model.onnx")
            assert _files(reader.disk.root)  # still there: the other process's start kept it
            assert _files(other.disk.root) == []
            reader.disk.close()
            other.disk.close()

    asyncio.run(scenario())
