"""Verify a cross-compiled TVM library under qemu-user: correct, not timed.

A library built for aarch64 cannot be loaded by this process. The compiler
instead builds ``loader/tvm_loader.cc`` (a small C++ program over the tvm-ffi
headers) with the target's cross compiler, links it against the target's TVM
runtime (``libtvm_runtime.so`` and ``libtvm_ffi.so`` from the target's wheels,
which ``scripts/setup test`` unpacks into ``.cache/aarch64-tvm``), runs it under
``qemu-<arch>`` with the target's sysroot on the test inputs, and compares the
outputs with onnxruntime's on this host. Emulation says nothing about speed,
so cross builds are reported "verified under emulation, not timed".

The loader is built once per (source, runtime, compiler) and kept under the
work folder; inputs and outputs travel as raw files.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from kubeinfer_runtime.compile.targets import TargetSpec
from kubeinfer_runtime.models.base import Array, TensorSpec

LOADER_SOURCE = Path(__file__).parent / "loader" / "tvm_loader.cc"
RUNTIME_LIBS = ("libtvm_runtime.so", "libtvm_ffi.so")
#: One emulated run of a small model takes well under a second; a hung one is a failure.
RUN_TIMEOUT_S = 120


class EmulationError(Exception):
    """The library could not be run under emulation (the message says why)."""


def runtime_lib_dir(folder: str | None) -> Path | None:
    """Where the target's TVM runtime libraries are: ``folder`` or ``folder/lib``."""
    if not folder:
        return None
    for cand in (Path(folder), Path(folder) / "lib"):
        if all((cand / lib).is_file() for lib in RUNTIME_LIBS):
            return cand
    return None


def emulation_problem(spec: TargetSpec, folder: str | None) -> str:
    """Why ``spec`` cannot be verified here ("" when it can)."""
    if not spec.qemu or not spec.cxx or not spec.sysroot:
        return f"no emulator is known for target {spec.name.value}"
    missing = [tool for tool in (spec.qemu, spec.cxx) if shutil.which(tool) is None]
    if missing:
        return (f"{' and '.join(missing)} not installed (apt-get install qemu-user "
                f"g++-{spec.sysroot.rsplit('/', 1)[-1]})")
    if runtime_lib_dir(folder) is None:
        return (f"the {spec.family} TVM runtime ({', '.join(RUNTIME_LIBS)}) is not in "
                f"KUBEINFER_CROSS_RUNTIME_DIR ({folder or 'unset'}): run scripts/setup test")
    if not Path(spec.sysroot).is_dir():
        return f"the {spec.family} sysroot {spec.sysroot} is missing"
    return ""


def build_loader(spec: TargetSpec, libs: Path, cache: Path) -> Path:
    """The loader for ``spec`` linked against ``libs`` (built on first use, then reused)."""
    import tvm_ffi.libinfo

    assert spec.cxx is not None
    includes = [tvm_ffi.libinfo.find_include_path(), tvm_ffi.libinfo.find_dlpack_include_path()]
    key = hashlib.sha256(LOADER_SOURCE.read_bytes() + str(libs.resolve()).encode()
                         + spec.cxx.encode() + "".join(includes).encode()).hexdigest()[:16]
    out = cache / f"tvm-loader-{spec.family}-{key}"
    if out.is_file():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    cmd = [spec.cxx, "-std=c++17", "-O2", *(f"-I{i}" for i in includes), "-o", str(tmp),
           str(LOADER_SOURCE), f"-L{libs}", "-ltvm_ffi", "-ltvm_runtime",
           f"-Wl,-rpath,{libs.resolve()}"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise EmulationError(f"the loader did not compile with {spec.cxx}: "
                             f"{done.stderr.strip()[-600:]}")
    tmp.replace(out)
    return out


def run(spec: TargetSpec, loader: Path, library: Path, inputs: list[tuple[TensorSpec, Array]],
        outputs: list[TensorSpec]) -> list[Array]:
    """Run ``library`` once under qemu on ``inputs`` (in the model's order)."""
    assert spec.qemu is not None and spec.sysroot is not None
    with tempfile.TemporaryDirectory(prefix="kubeinfer-emulate-") as tmp:
        folder = Path(tmp)
        args = []
        for i, (t, a) in enumerate(inputs):
            path = folder / f"in{i}.bin"
            np.ascontiguousarray(a).tofile(path)
            args.append(f"{path}:{t.dtype.name}:{','.join(str(d) for d in a.shape)}")
        try:
            done = subprocess.run([spec.qemu, "-L", spec.sysroot, str(loader), str(library),
                                   str(folder), *args], capture_output=True, text=True,
                                  timeout=RUN_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            raise EmulationError(f"the emulated run took over {RUN_TIMEOUT_S} s") from None
        if done.returncode != 0:
            raise EmulationError(f"the emulated run failed ({done.returncode}): "
                                 f"{done.stderr.strip()[-600:]}")
        results = []
        for i, line in enumerate(done.stdout.split("\n")[:len(outputs)]):
            name, dtype, dims = line.split()
            shape = tuple(int(d) for d in dims.split(",") if d)
            data = np.fromfile(folder / f"{name}.bin", np.dtype(dtype))
            if data.size != int(np.prod(shape)):
                raise EmulationError(f"output {i} has {data.size} values, not {shape}")
            results.append(data.reshape(shape))
        if len(results) != len(outputs):
            raise EmulationError(f"the model returned {len(results)} outputs, not "
                                 f"{len(outputs)}")
        return results
