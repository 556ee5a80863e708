"""Model bytes as hostile input: ONNX external data, artifact tarballs, download bounds,
and the multi-model disk cache shared by a server's processes.

Real onnxruntime and onnx, real files, real processes (the disk cache's owners). What
each test pins is in README.md, "Threat model" (what a hostile model can and cannot do).
"""

from __future__ import annotations

import gzip
import io
import os
import re
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest

from kubeinfer_runtime.compile import bundle
from kubeinfer_runtime.compile.errors import BadInput
from kubeinfer_runtime.compile.manifest import ArtifactError
from kubeinfer_runtime.compile.signature import read_model
from kubeinfer_runtime.errors import InsufficientStorage, NotReady
from kubeinfer_runtime.models.base import ModelLoadError
from kubeinfer_runtime.models.onnx import (
    SAFE_ORT_VERSION,
    OnnxBackend,
    external_data_problem,
)
from kubeinfer_runtime.storage.diskcache import DiskCache
from kubeinfer_runtime.storage.fetch import (
    MAX_MODEL_BYTES_SETTING,
    ModelChanged,
    ModelTooLarge,
    cache_path,
    length_problem,
)
from kubeinfer_runtime.storage.uri import InvalidModelUri, S3Location, parse_model_uri

REPO = Path(__file__).resolve().parents[2]
#: 32 bytes: eight float32 values, what the crafted model's one initializer reads.
SECRET = b"AKIA-NOT-A-REAL-KEY-0123456789ab"


# ------------------------------------------------------------------ ONNX external data


def _external_data_model(path: Path, location: str) -> Path:
    """``y = x + w``, ``w`` eight float32 read from the external file ``location``."""
    from onnx import TensorProto, helper

    w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[8],
                    data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", "0"), ("length", "32")):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])], "external",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture
def secret_tree(tmp_path: Path) -> tuple[Path, Path]:
    """(the model folder, a secret file outside it), as a pod's mounted Secret would be."""
    secret = tmp_path / "run" / "secrets" / "s3" / "secret-key"
    secret.parent.mkdir(parents=True)
    secret.write_bytes(SECRET)
    models = tmp_path / "srv" / "models"
    models.mkdir(parents=True)
    return models, secret


def _hostile_models(models: Path, secret: Path) -> dict[str, Path]:
    os.symlink(secret, models / "weights.bin")
    os.symlink(secret.parent, models / "weights")
    rel = os.path.relpath(secret, models)
    return {
        "relative ../": _external_data_model(models / "dotdot.onnx", rel),
        "deep relative": _external_data_model(models / "a" / "b" / "deep.onnx",
                                              "../../" + rel),
        "absolute": _external_data_model(models / "absolute.onnx", str(secret)),
        "symlinked file": _external_data_model(models / "link.onnx", "weights.bin"),
        "symlinked folder": _external_data_model(models / "linkdir.onnx",
                                                 f"weights/{secret.name}"),
    }


def test_a_model_cannot_read_files_outside_its_folder(secret_tree: tuple[Path, Path]) -> None:
    models, secret = secret_tree
    for what, path in _hostile_models(models, secret).items():
        backend = OnnxBackend()
        with pytest.raises(ModelLoadError) as info:
            backend.load(path)
        message = str(info.value)
        assert "external data" in message and "beside the model" in message, (what, message)
        # Described, never quoted: not the bytes, not the path the model names.
        assert SECRET.decode() not in message and "secret" not in message, (what, message)
        with pytest.raises(Exception, match="not loaded"):
            backend.predict({"x": np.zeros(8, np.float32)})


def test_external_data_beside_the_model_still_loads(tmp_path: Path) -> None:
    weights = np.arange(8, dtype=np.float32)
    (tmp_path / "w.bin").write_bytes(weights.tobytes())
    backend = OnnxBackend()
    backend.load(_external_data_model(tmp_path / "model.onnx", "w.bin"))
    out = backend.predict({"x": np.ones(8, np.float32)})
    assert out["y"].tolist() == (weights + 1).tolist()


def test_an_onnxruntime_that_reads_any_file_loads_nothing() -> None:
    for unsafe in ("1.18.0", "1.20.1", "1.23.2", "1.24.0"):
        problem = external_data_problem(unsafe)
        assert problem is not None and f"onnxruntime {unsafe}" in problem
        assert "onnxruntime>=1.24.1" in problem
    for safe in ("1.24.1", "1.31.1", "1.25.0.dev20260101", "2.0"):
        assert external_data_problem(safe) is None
    import onnxruntime

    assert external_data_problem(onnxruntime.__version__) is None


def test_the_package_requires_a_safe_onnxruntime() -> None:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [d for d in deps if re.match(r"onnxruntime\b", d)]
    floor = re.fullmatch(r"onnxruntime>=([\d.]+)", spec)
    assert floor is not None, spec
    assert tuple(map(int, floor.group(1).split("."))) >= SAFE_ORT_VERSION


def test_compile_refuses_external_data_outside_the_model(
        secret_tree: tuple[Path, Path]) -> None:
    models, secret = secret_tree
    for what, path in _hostile_models(models, secret).items():
        with pytest.raises(BadInput, match="names external data that is not a plain file") as e:
            read_model(path)
        assert SECRET.decode() not in e.value.message, what


# ------------------------------------------------------------------ download bounds


def test_length_problem_names_the_limit_and_never_over_writes() -> None:
    uri = "s3://models/huge.onnx"
    assert length_problem(uri, 100, max_bytes=100, expect_bytes=None, complete=True) is None
    over = length_problem(uri, 101, max_bytes=100, expect_bytes=None, complete=True)
    assert isinstance(over, ModelTooLarge) and isinstance(over, InsufficientStorage)
    assert over.status == 507
    assert MAX_MODEL_BYTES_SETTING in over.message and "101 bytes" in over.message
    streaming = length_problem(uri, 101, max_bytes=100, expect_bytes=None, complete=False)
    assert streaming is not None and "at least 101 bytes" in streaming.message
    # The multi-model disk cache made room for 50 bytes: more is refused as it arrives,
    # fewer once complete; both say retry.
    for length, complete in ((51, False), (51, True), (49, True)):
        changed = length_problem(uri, length, max_bytes=100, expect_bytes=50,
                                 complete=complete)
        assert isinstance(changed, ModelChanged) and isinstance(changed, NotReady)
        assert "50 bytes when the disk cache made room" in changed.message
    assert length_problem(uri, 49, max_bytes=100, expect_bytes=50, complete=False) is None
    assert length_problem(uri, 50, max_bytes=100, expect_bytes=50, complete=True) is None


@pytest.mark.parametrize("key", ["a/.", ".", "a/b/../../c", "..", "%2e%2e/x", "a\\..\\..\\x",
                                 "/etc/passwd", "a/", "x/" + "y" * 200])
def test_object_keys_never_leave_the_cache_folder(tmp_path: Path, key: str) -> None:
    cache = tmp_path / "cache"
    try:
        loc = parse_model_uri(f"s3://bucket/{key}")
    except InvalidModelUri:
        return  # refused before any I/O
    assert isinstance(loc, S3Location)
    dest = cache_path(cache, loc).resolve()
    assert dest.is_relative_to(cache.resolve()) and dest != cache.resolve()


# ------------------------------------------------------------------ artifact tarballs


def _gzip_tar(path: Path, blocks: list[bytes | int]) -> Path:
    """A .tar.gz of raw 512-byte blocks; an int is that many zero bytes (written in MiBs)."""
    with gzip.open(path, "wb", compresslevel=9) as gz:
        for block in blocks:
            if isinstance(block, int):
                for start in range(0, block, 1 << 20):
                    gz.write(bytes(min(1 << 20, block - start)))
            else:
                gz.write(block)
        gz.write(b"\0" * 1024)
    return path


def _member(name: str, data: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info.tobuf(format=tarfile.USTAR_FORMAT) + data + b"\0" * (-len(data) % 512)


def _pax_bomb(path: Path, declared: int) -> Path:
    """A PAX header declaring ``declared`` bytes (zeros: a few KB of gzip), then a file."""
    header = tarfile.TarInfo("././@PaxHeader")
    header.type, header.size = tarfile.XHDTYPE, declared
    return _gzip_tar(path, [header.tobuf(format=tarfile.USTAR_FORMAT), declared,
                            _member("manifest.json", b"{}")])


def _rss_of(code: str) -> tuple[str, int]:
    """Run ``code`` in a fresh interpreter; (its stdout, its peak RSS in MiB: VmHWM, which
    an exec starts afresh, unlike ru_maxrss)."""
    probe = textwrap.dedent(code) + textwrap.dedent("""
        import re
        status = open("/proc/self/status").read()
        print(int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) >> 10)
    """)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=300, check=True).stdout.split()
    return " ".join(out[:-1]), int(out[-1])


def test_an_extension_header_bomb_is_refused_before_it_is_read(tmp_path: Path) -> None:
    declared = 256 << 20
    bomb = _pax_bomb(tmp_path / "bomb.tar.gz", declared)
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(ArtifactError, match=rf"extension header .* of {declared} bytes, over "
                                            rf"{bundle.MAX_EXTENSION_HEADER_BYTES}"):
        bundle.unpack(bomb, tmp_path / "out")
    # Asking whether it is a tarball reads the first member: bounded too, in memory.
    said, peak = _rss_of(f"""
        from pathlib import Path
        from kubeinfer_runtime.compile import bundle
        print(bundle.is_tarball(Path({str(bomb)!r})))
    """)
    assert said == "True" and peak < 150, peak


def test_chains_of_extension_headers_are_bounded(tmp_path: Path) -> None:
    header = tarfile.TarInfo("././@PaxHeader")
    header.type, header.size = tarfile.XHDTYPE, 0
    chain = [header.tobuf(format=tarfile.USTAR_FORMAT)] * (bundle.MAX_EXTENSION_HEADERS + 1)
    tar = _gzip_tar(tmp_path / "chain.tar.gz", [*chain, _member("manifest.json", b"{}")])
    with pytest.raises(ArtifactError, match="more than 130 extension headers"):
        bundle.unpack(tar, tmp_path / "out")


def _checksummed(header: bytearray) -> bytes:
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def test_sparse_members_are_refused_before_their_map_is_read(tmp_path: Path) -> None:
    # An old-GNU sparse header whose map goes on in extension blocks: tarfile collects
    # every (offset, size) pair before yielding the member (~200 KB of gzip: 150 MB, 15 s).
    info = tarfile.TarInfo("model.so")
    info.type, info.size = tarfile.GNUTYPE_SPARSE, 0
    header = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    header[482] = 1  # isextended
    extension = bytearray(512)
    for i in range(21):
        extension[i * 24:i * 24 + 24] = b"%011o\0%011o\0" % (i + 1, 1)
    extension[504] = 1
    tar = _gzip_tar(tmp_path / "sparse.tar.gz",
                    [_checksummed(header), *[bytes(extension)] * 2000])
    started = time.monotonic()
    with pytest.raises(ArtifactError, match="holds a sparse file"):
        bundle.unpack(tar, tmp_path / "out")
    assert time.monotonic() - started < 5
    assert bundle.is_tarball(tar)  # a tarball, refused by unpack with the reason


def test_pax_sparse_members_are_refused(tmp_path: Path) -> None:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("model.so")
        info.size = 1
        info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                            "GNU.sparse.name": "model.so", "GNU.sparse.realsize": "1"}
        tar.addfile(info, io.BytesIO(b"x"))
    path = tmp_path / "pax-sparse.tar"
    path.write_bytes(out.getvalue())
    with pytest.raises(ArtifactError, match="holds a sparse file"):
        bundle.unpack(path, tmp_path / "out")


def test_real_artifacts_still_round_trip(tmp_path: Path) -> None:
    src = tmp_path / "artifact"
    src.mkdir()
    (src / "manifest.json").write_text("{}")
    (src / "model.so").write_bytes(b"\x7fELF" + b"x" * 1000)
    bundle.pack(src, tmp_path / "a.tar.gz")
    assert bundle.is_tarball(tmp_path / "a.tar.gz")
    bundle.unpack(tmp_path / "a.tar.gz", tmp_path / "out")
    assert (tmp_path / "out" / "model.so").read_bytes() == (src / "model.so").read_bytes()


# ------------------------------------------------------------------ the shared disk cache

_OWNER = """
import sys, time
from pathlib import Path
from kubeinfer_runtime.storage.diskcache import DiskCache

cache = DiskCache(Path(sys.argv[1]), budget_bytes=1000)
def download() -> Path:
    path = cache.root / "key" / "model.onnx"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"m" * 100)
    return path
path = cache.get("key", 100, download)
cache.unpin("key")
print(path, flush=True)
time.sleep(120)
"""


def _owner(shared: Path) -> tuple[subprocess.Popen[str], Path]:
    proc = subprocess.Popen([sys.executable, "-c", _OWNER, str(shared)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, Path(proc.stdout.readline().strip())


def test_processes_sharing_a_cache_folder_never_delete_each_others_files(
        tmp_path: Path) -> None:
    shared = tmp_path / "multi-model"
    first, first_file = _owner(shared)
    try:
        second, second_file = _owner(shared)
        try:
            assert first_file.is_file() and second_file.is_file()
            assert first_file.parent.parent != second_file.parent.parent
            mine = DiskCache(shared, budget_bytes=10)  # a third process starting
            assert first_file.is_file() and second_file.is_file()
            mine.close()
            assert not mine.root.exists()
        finally:
            second.kill()
            second.wait()
        # The second is gone: the next start removes its folder, never the live one's.
        DiskCache(shared, budget_bytes=10).close()
        assert first_file.is_file() and not second_file.exists()
        assert not second_file.parent.parent.with_name(
            second_file.parent.parent.name + ".lock").exists()
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()


def test_a_start_clears_what_no_live_process_holds(tmp_path: Path) -> None:
    shared = tmp_path / "multi-model"
    (shared / "0123456789abcdef").mkdir(parents=True)  # the layout before per-process folders
    (shared / "0123456789abcdef" / "model.onnx").write_bytes(b"old")
    (shared / ".download-x").write_bytes(b"half")
    cache = DiskCache(shared, budget_bytes=10)
    assert sorted(p.name for p in shared.iterdir()) == sorted(
        [".lock", cache.root.name, cache.root.name + ".lock"])
    assert not any(cache.root.iterdir())
