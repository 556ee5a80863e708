"""Model format ``compiled``: an artifact of ``kubeinfer compile``, checked, then served.

An artifact is a folder (or its ``.tar.gz``) holding ``manifest.json`` and the
files it lists. Loading goes in the order that keeps untrusted or foreign code
from ever running: read and validate the manifest; hash every file against it
(a tampered or truncated file is refused); compare the target it was built for
with this host (triple and CPU features, ``compile.hostcheck``), naming both on
a mismatch; only then hand the files to the backend the manifest names: ``tvm``
(the libraries, ``dlopen``-ed by TVM) or ``onnx`` (an onnxruntime-optimised or
quantized model). Every refusal is a :class:`ModelLoadError`: the model server
reports it on ``/ping`` and stays up.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kubeinfer_runtime.compile.bundle import is_tarball, unpack
from kubeinfer_runtime.compile.hostcheck import HostInfo, compatibility_problem, read_host
from kubeinfer_runtime.compile.manifest import (
    ArtifactError,
    Manifest,
    TensorInfo,
    read_manifest,
    verify_files,
)
from kubeinfer_runtime.errors import ModelError
from kubeinfer_runtime.models.base import (
    Backend,
    ModelLoadError,
    ModelMetadata,
    Tensors,
    TensorSpec,
)


def tensor_spec(t: TensorInfo) -> TensorSpec:
    shape = None if t.shape is None else tuple(t.shape)
    return TensorSpec(t.name, np.dtype(t.dtype), shape)


def open_artifact(path: Path, host: HostInfo | None = None) -> tuple[Path, Manifest, Path | None]:
    """The checked artifact folder and manifest at ``path`` (a folder or a tarball).

    Returns (folder, manifest, temporary folder to delete on unload or None).
    Raises ArtifactError when it is not an artifact, is damaged or is not for
    ``host`` (this machine by default).
    """
    temp: Path | None = None
    root = path
    if not path.is_dir():
        if not is_tarball(path):
            raise ArtifactError(f"{path.name} is neither an artifact folder nor its .tar.gz: "
                                "point the model URI at the output of kubeinfer compile, or "
                                "set the model format to onnx")
        temp = Path(tempfile.mkdtemp(prefix="kubeinfer-compiled-"))
        root = temp
        try:
            unpack(path, root)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
    try:
        manifest = read_manifest(root)
        verify_files(root, manifest)
        problem = compatibility_problem(manifest.target.artifact_target(), host or read_host())
        if problem:
            raise ArtifactError(problem)
    except BaseException:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
        raise
    return root, manifest, temp


def backend_for(manifest: Manifest, *, intra_op_threads: int) -> tuple[Backend, str]:
    """The backend serving ``manifest``'s files, and the file or folder to load it from."""
    if manifest.backend == "onnx":
        from kubeinfer_runtime.models.onnx import OnnxBackend

        return OnnxBackend(intra_op_threads=intra_op_threads), manifest.files[0].path
    from kubeinfer_runtime.models.tvm import TvmBackend, TvmLibrary

    libraries = [TvmLibrary(f.path, f.batch_size) for f in manifest.files]
    backend = TvmBackend(inputs=[tensor_spec(t) for t in manifest.inputs],
                         outputs=[tensor_spec(t) for t in manifest.outputs],
                         libraries=libraries, latency_s=dict(manifest.latency_s),
                         intra_op_threads=intra_op_threads)
    return backend, "."


class CompiledBackend(Backend):
    """Checks an artifact, then delegates to the backend its manifest names."""

    def __init__(self, *, intra_op_threads: int = 1) -> None:
        self._threads = intra_op_threads
        self._inner: Backend | None = None
        self._temp: Path | None = None
        self.manifest: Manifest | None = None

    def load(self, path: Path) -> None:
        try:
            root, manifest, temp = open_artifact(path)
        except ArtifactError as e:
            raise ModelLoadError(str(e)) from None
        inner, rel = backend_for(manifest, intra_op_threads=self._threads)
        try:
            inner.load(root if rel == "." else root / rel)
        except BaseException:
            if temp is not None:
                shutil.rmtree(temp, ignore_errors=True)
            raise
        self._inner, self._temp, self.manifest = inner, temp, manifest

    def predict(self, inputs: Tensors, output_names: Sequence[str] | None = None) -> Tensors:
        inner = self._inner
        if inner is None:
            raise ModelError("Model is not loaded: wait until /ping answers 200")
        return inner.predict(inputs, output_names)

    def unload(self) -> None:
        if self._inner is not None:
            self._inner.unload()
        self._inner = None
        if self._temp is not None:
            shutil.rmtree(self._temp, ignore_errors=True)
            self._temp = None

    def metadata(self) -> ModelMetadata:
        if self._inner is None:
            raise ModelError("Model is not loaded")
        meta = self._inner.metadata()
        platform = "tvm" if self.manifest and self.manifest.backend == "tvm" else meta.platform
        return ModelMetadata(meta.inputs, meta.outputs, platform)
