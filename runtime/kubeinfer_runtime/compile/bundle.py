"""An artifact directory as one ``.tar.gz`` object, and back, with bounds.

The tarball is what an ``s3://`` variant names (the object store has no
folders to download); the model server unpacks it before reading the manifest.
Unpacking is a decoder of untrusted bytes, so it is bounded: only regular files
at the top level (no links, folders, devices, absolute or ``..`` names), at most
``MAX_MEMBERS`` of them and ``MAX_UNPACKED_BYTES`` in all; anything else is
refused before a byte is written.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

from kubeinfer_runtime.compile.manifest import ArtifactError

MAX_MEMBERS = 65
MAX_UNPACKED_BYTES = 8 << 30


def pack(src: Path, dest: Path) -> None:
    """``dest`` (.tar.gz) holding the files of ``src`` at its top level, sorted, mtimes zeroed."""
    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.mtime = 0
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    with tarfile.open(dest, "w:gz", compresslevel=6) as tar:
        for path in sorted(src.iterdir()):
            if path.is_file():
                tar.add(path, arcname=path.name, filter=clean)


def is_tarball(path: Path) -> bool:
    return path.is_file() and tarfile.is_tarfile(path)


def unpack(src: Path, dest: Path) -> None:
    """Unpack ``src`` into the empty folder ``dest``; ArtifactError when it is not a safe bundle."""
    try:
        with tarfile.open(src, "r:*") as tar:
            members: list[tarfile.TarInfo] = []
            total = 0
            for info in tar:
                if len(members) >= MAX_MEMBERS:
                    raise ArtifactError(f"Artifact {src.name} holds more than {MAX_MEMBERS} "
                                        "files: it is not a compiled artifact")
                name = info.name.removeprefix("./")
                if not info.isfile() or "/" in name or name in ("", ".", ".."):
                    raise ArtifactError(f"Artifact {src.name} holds {info.name[:80]!r}, which "
                                        "is not a plain top-level file: it is not a compiled "
                                        "artifact")
                total += info.size
                if total > MAX_UNPACKED_BYTES:
                    raise ArtifactError(f"Artifact {src.name} unpacks to more than "
                                        f"{MAX_UNPACKED_BYTES >> 30} GiB: refused")
                members.append(info)
            dest.mkdir(parents=True, exist_ok=True)
            for info in members:
                tar.extract(info, dest, filter="data")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ArtifactError(f"Artifact {src.name} cannot be unpacked ({e}): it is not a "
                            "compiled artifact's .tar.gz, or it is damaged") from None
