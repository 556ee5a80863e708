"""Can this host run an artifact? Triple and CPU features, checked before ``dlopen``.

Why before: loading a library built for another architecture fails with an
unhelpful loader error, and one built for CPU features the host lacks loads
fine and dies with SIGILL at the first request. So the manifest records the
target's architecture and the CPU features its code may use (as ``/proc/cpuinfo``
names them), and the loader compares them with this host's.

Only instruction-set extensions a compiler's vectorizer or code generator can
emit are recorded (``CODEGEN_FEATURES``): system features LLVM also lists for a
CPU (``waitpkg``, ``xsaves``, ``pku``) are often hidden by hypervisors and never
appear in generated kernels, so requiring them would refuse artifacts that run.
The mapping and the comparison are pure; :func:`read_host` is the only I/O.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

#: LLVM feature name -> /proc/cpuinfo flag, per architecture family.
CODEGEN_FEATURES: dict[str, dict[str, str]] = {
    "x86_64": {
        "sse": "sse", "sse2": "sse2", "sse3": "pni", "ssse3": "ssse3", "sse4.1": "sse4_1",
        "sse4.2": "sse4_2", "crc32": "sse4_2", "sse4a": "sse4a", "avx": "avx", "avx2": "avx2",
        "fma": "fma", "fma4": "fma4", "f16c": "f16c", "bmi": "bmi1", "bmi2": "bmi2",
        "lzcnt": "abm", "popcnt": "popcnt", "movbe": "movbe", "aes": "aes",
        "pclmul": "pclmulqdq", "sha": "sha_ni", "adx": "adx", "cx16": "cx16",
        "avx512f": "avx512f", "avx512cd": "avx512cd", "avx512bw": "avx512bw",
        "avx512dq": "avx512dq", "avx512vl": "avx512vl", "avx512ifma": "avx512ifma",
        "avx512vbmi": "avx512vbmi", "avx512vbmi2": "avx512_vbmi2",
        "avx512vnni": "avx512_vnni", "avx512bitalg": "avx512_bitalg",
        "avx512vpopcntdq": "avx512_vpopcntdq", "avx512bf16": "avx512_bf16",
        "avx512fp16": "avx512_fp16", "avxvnni": "avx_vnni", "gfni": "gfni", "vaes": "vaes",
        "vpclmulqdq": "vpclmulqdq", "amx-tile": "amx_tile", "amx-int8": "amx_int8",
        "amx-bf16": "amx_bf16",
    },
    "aarch64": {
        "neon": "asimd", "fp-armv8": "fp", "crc": "crc32", "aes": "aes", "sha2": "sha2",
        "dotprod": "asimddp", "fullfp16": "fphp", "sve": "sve", "sve2": "sve2",
        "i8mm": "i8mm", "bf16": "bf16", "lse": "atomics",
    },
    "arm": {"neon": "neon", "vfp3": "vfpv3", "vfp4": "vfpv4", "d32": "vfpd32"},
}


def arch_family(name: str) -> str:
    """``x86_64``, ``aarch64`` or ``arm`` from a machine name or an LLVM triple."""
    first = name.split("-", 1)[0].lower()
    if first in ("x86_64", "amd64", "x86-64"):
        return "x86_64"
    if first in ("aarch64", "arm64"):
        return "aarch64"
    if first.startswith("arm"):
        return "arm"
    return first


def required_flags(family: str, llvm_features: Iterable[str]) -> list[str]:
    """The /proc/cpuinfo flags code generated with ``llvm_features`` may need, sorted."""
    table = CODEGEN_FEATURES.get(family, {})
    return sorted({table[f] for f in llvm_features if f in table})


@dataclass(frozen=True)
class HostInfo:
    #: Architecture family (``arch_family``).
    family: str
    #: platform.machine(), for messages.
    machine: str
    flags: frozenset[str]
    #: ``model name`` from /proc/cpuinfo (may be empty).
    cpu_model: str = ""

    def describe(self) -> str:
        return f"{self.machine} ({self.cpu_model})" if self.cpu_model else self.machine


@dataclass(frozen=True)
class ArtifactTarget:
    """What the manifest says an artifact was built for."""

    name: str
    triple: str
    cpu: str
    flags: tuple[str, ...]
    #: True for an ONNX file: it runs wherever onnxruntime runs.
    portable: bool = False

    def describe(self) -> str:
        if self.portable:
            return f"{self.name} (portable ONNX)"
        return f"{self.name} ({self.triple}, CPU {self.cpu or 'generic'})"


def compatibility_problem(target: ArtifactTarget, host: HostInfo) -> str | None:
    """Why ``host`` cannot run an artifact built for ``target``, or None when it can."""
    if target.portable:
        return None
    family = arch_family(target.triple)
    if family != host.family:
        return (f"Artifact is compiled for target {target.describe()} but this host is "
                f"{host.describe()}: compile the model for this host (target native) or run "
                f"the artifact on an {family} machine")
    missing = sorted(set(target.flags) - host.flags)
    if missing:
        shown = ", ".join(missing[:12]) + (", ..." if len(missing) > 12 else "")
        generic = "x86-64-v3 or x86-64" if family == "x86_64" else family
        return (f"Artifact is compiled for target {target.describe()} and needs CPU features "
                f"this host ({host.describe()}) lacks: {shown}: compile it for target native "
                f"on this kind of machine, or for a generic target ({generic})")
    return None


def parse_cpuinfo(text: str) -> tuple[frozenset[str], str]:
    """Flags (x86 ``flags``, ARM ``Features``) and the model name from /proc/cpuinfo."""
    flags: set[str] = set()
    model = ""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip().lower()
        if key in ("flags", "features") and not flags:
            flags = set(value.split())
        elif key in ("model name", "cpu model", "hardware") and not model:
            model = value.strip()
    return frozenset(flags), model


def read_host(cpuinfo: Path = Path("/proc/cpuinfo")) -> HostInfo:
    machine = platform.machine()
    try:
        flags, model = parse_cpuinfo(cpuinfo.read_text(errors="replace"))
    except OSError:
        flags, model = frozenset(), ""
    return HostInfo(arch_family(machine), machine, flags, model)
