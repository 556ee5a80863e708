"""Fixtures shared by unit and integration tests: example models, real S3 server."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent


def _load_build_models() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "build_models", REPO / "examples" / "build_models.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["build_models"] = mod
    spec.loader.exec_module(mod)
    return mod


build_models = _load_build_models()


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """iris.onnx, iris-v2.onnx (scikit-learn) and mlp.onnx (onnx.helper), built fresh."""
    out = tmp_path_factory.mktemp("models")
    build_models.build_all(out)
    return out


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A real SeaweedFS S3 server for the whole session (credentials enforced)."""
    from tests.support.s3 import start_s3

    server = start_s3(tmp_path_factory.mktemp("s3"))
    yield server
    server.stop()
