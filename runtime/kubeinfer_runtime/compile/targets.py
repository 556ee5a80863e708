"""Compilation targets: what LLVM is told, which compiler links, how a build is checked.

Pure: ``target_spec`` maps a ``CompileTarget`` (and, for ``native``, the host's
CPU as LLVM names it) to everything the build and the checks need. ``native``
uses the name ``tvm.target.codegen.llvm_get_system_cpu()`` reports (the caller
passes it in): TVM 0.27 silently ignores ``mcpu=native`` and emits generic
code.

A target is *timed* when this host can run it (its architecture, and every CPU
feature it needs, present here): candidates are then measured against
onnxruntime. Otherwise it is *cross*: built with the target's cross compiler
and, where qemu-user and the target's TVM runtime are at hand, *verified* under
emulation (correct, not timed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kubeinfer_runtime.compile.hostcheck import arch_family
from kubeinfer_runtime.contract.compile import CompileTarget

_HOST_TRIPLES = {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu",
                 "arm": "armv7l-linux-gnueabihf"}


@dataclass(frozen=True)
class TargetSpec:
    name: CompileTarget
    #: LLVM target triple.
    triple: str
    #: LLVM CPU name; empty: the triple's generic CPU.
    cpu: str
    #: Extra LLVM target attributes (``mfloat-abi``, ``mattr``).
    extra: dict[str, object] = field(default_factory=dict)
    #: C compiler that links the library; None: TVM's default (the host's cc).
    cc: str | None = None
    #: C++ cross compiler for the emulation loader; None when not cross.
    cxx: str | None = None
    #: qemu-user binary and sysroot that run the target's programs here.
    qemu: str | None = None
    sysroot: str | None = None

    @property
    def family(self) -> str:
        return arch_family(self.triple)

    @property
    def cross(self) -> bool:
        """Built with a cross compiler: never loadable by this process."""
        return self.cc is not None

    def llvm(self) -> dict[str, object]:
        """The ``tvm.target.Target`` dict (string targets are refused by TVM 0.27)."""
        out: dict[str, object] = {"kind": "llvm", "mtriple": self.triple}
        if self.cpu:
            out["mcpu"] = self.cpu
        out.update(self.extra)
        return out


_X86 = {
    CompileTarget.X86_64: "x86-64",
    CompileTarget.X86_64_V3: "x86-64-v3",
    CompileTarget.HASWELL: "haswell",
    CompileTarget.SKYLAKE_AVX512: "skylake-avx512",
    CompileTarget.ZNVER4: "znver4",
}


def target_spec(name: CompileTarget, *, host_machine: str, host_cpu: str) -> TargetSpec:
    """Everything about ``name``; ``host_cpu`` is LLVM's name of this host's CPU."""
    host_family = arch_family(host_machine)
    if name is CompileTarget.NATIVE:
        return TargetSpec(name, _HOST_TRIPLES.get(host_family, f"{host_machine}-linux-gnu"),
                          host_cpu)
    if name in _X86:
        spec = TargetSpec(name, "x86_64-linux-gnu", _X86[name])
        if host_family != "x86_64":
            spec = TargetSpec(name, spec.triple, spec.cpu, cc="x86_64-linux-gnu-gcc",
                              cxx="x86_64-linux-gnu-g++", qemu="qemu-x86_64",
                              sysroot="/usr/x86_64-linux-gnu")
        return spec
    if name is CompileTarget.AARCH64:
        if host_family == "aarch64":
            return TargetSpec(name, "aarch64-linux-gnu", "generic")
        return TargetSpec(name, "aarch64-linux-gnu", "generic", cc="aarch64-linux-gnu-gcc",
                          cxx="aarch64-linux-gnu-g++", qemu="qemu-aarch64",
                          sysroot="/usr/aarch64-linux-gnu")
    if name is CompileTarget.ARMV7:
        return TargetSpec(name, "armv7l-linux-gnueabihf", "generic",
                          extra={"mfloat-abi": "hard", "mattr": ["+neon"]},
                          cc="arm-linux-gnueabihf-gcc", cxx="arm-linux-gnueabihf-g++",
                          qemu="qemu-arm", sysroot="/usr/arm-linux-gnueabihf")
    raise ValueError(f"no spec for target {name}")  # pragma: no cover - enum is exhaustive
