"""Fixtures shared by the e2e modules: the example models and a namespace per test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e.cluster import DEPS_NAMESPACE, S3_SECRET, create_s3_secret, kubectl
from e2e.inference import build_example_models


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example models, built by the same scripts the image build runs."""
    return build_example_models(tmp_path_factory.mktemp("models"))


@pytest.fixture
def namespace() -> Iterator[str]:
    """A fresh namespace per test, deleted afterwards (with everything left in it).

    When run.sh installed the chart with ``runtime.s3.secretName`` (the async
    test's object store), every model server mounts that Secret, so it is
    created in each namespace: without it no model-server pod would start.
    """
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    kubectl("create", "namespace", name)
    try:
        if S3_SECRET is not None and DEPS_NAMESPACE is not None:
            create_s3_secret(name)
        yield name
    finally:
        kubectl("delete", "namespace", name, "--wait=false", check=False)
