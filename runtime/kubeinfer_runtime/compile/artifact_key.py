"""The artifact cache's key: what must be equal for a stored artifact to stand in for a compile.

A variant that says ``compile: {target: native}`` is compiled on every new
rollout and every new node kind; most of those compiles would repeat one done
before. An artifact can be reused exactly when everything that decided it is
the same: the source model's bytes (and the calibration set's), the target as
resolved on the compiling machine (triple, LLVM CPU name, the CPU features its
code may use: ``native`` on another CPU is another target), the compiler and
runtime versions, and the settings that change the choice
(``contract.compile.ARTIFACT_KEY_FIELDS``). Pure: the caller gathers the facts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence

from kubeinfer_runtime.compile.manifest import FORMAT

#: Versions that change what is built or how it is measured.
KEY_VERSIONS = ("tvm", "tvm_ffi", "onnxruntime", "onnx", "kubeinfer")
#: Hex digits of the key (128 bits: collisions are not a concern at any cache size).
KEY_HEX = 32


def artifact_key(*, source_sha256: str, calibration_sha256: str | None,
                 target: Mapping[str, object], cpu_flags: Sequence[str],
                 versions: Mapping[str, str], settings: Mapping[str, object]) -> str:
    """The folder name under ``artifact_cache_uri`` for these facts.

    ``target`` is the LLVM target dict (``TargetSpec.llvm()``), ``cpu_flags``
    the /proc/cpuinfo flags its code may use, ``settings`` the
    ``CompileSettings.key_settings()``.
    """
    material = {
        "format": FORMAT,
        "source": source_sha256,
        "calibration": calibration_sha256,
        "target": dict(target),
        "cpu_flags": sorted(cpu_flags),
        "versions": {k: versions.get(k, "") for k in KEY_VERSIONS},
        "settings": dict(settings),
    }
    text = json.dumps(material, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_HEX]
