"""An artifact directory as one ``.tar.gz`` object, and back, with bounds.

The tarball is what an ``s3://`` variant names (the object store has no
folders to download); the model server unpacks it before reading the manifest.
Unpacking is a decoder of untrusted bytes, so it is bounded: only regular files
at the top level (no links, folders, devices, absolute or ``..`` names), at most
``MAX_MEMBERS`` of them and ``MAX_UNPACKED_BYTES`` in all; anything else is
refused before a byte is written.

``tarfile`` also does work of its own before it yields a member, which the
checks above never see: it reads a PAX or GNU long-name header whole into
memory, follows a chain of PAX headers by recursion, and collects a sparse
file's map block after block (a few MB of gzip declare GiB of any of them).
:class:`BoundedTarInfo` bounds that work (``MAX_EXTENSION_HEADER_BYTES`` per
header, ``MAX_EXTENSION_HEADERS`` per archive, checked on the declared size
before reading) and refuses sparse members outright: ``pack`` never writes
either, so only a crafted tarball holds them. Opening a tarball to ask whether
it is one (``is_tarball``) reads its first member, so it goes through the same
bounds.
"""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Any

from kubeinfer_runtime.compile.manifest import ArtifactError

MAX_MEMBERS = 65
MAX_UNPACKED_BYTES = 8 << 30
#: Largest PAX (``x``/``g``) or GNU long-name (``L``/``K``) header: ``pack`` writes none
#: (its names are short), so this only has to leave room for another tar's habits.
MAX_EXTENSION_HEADER_BYTES = 64 << 10
#: Extension headers in one archive: at most one or two per member.
MAX_EXTENSION_HEADERS = 2 * MAX_MEMBERS
_EXTENSION_TYPES = frozenset({tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
                              tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK})


class _Refused(tarfile.TarError):
    """Raised from inside ``tarfile``'s header parsing; ``unpack`` reports its message."""


class BoundedTarInfo(tarfile.TarInfo):
    """A ``TarInfo`` that refuses, before ``tarfile`` reads them, an extension header over
    ``MAX_EXTENSION_HEADER_BYTES``, more than ``MAX_EXTENSION_HEADERS`` of them, and any
    sparse member (old GNU ``S`` headers and the PAX ``GNU.sparse`` formats)."""

    # ``_proc_member`` and ``_proc_gnusparse_*`` are private in tarfile (unchanged since
    # Python 3.2) and absent from typeshed.
    def _proc_member(self, archive: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise _Refused("holds a sparse file, which kubeinfer compile never writes")
        if self.type in _EXTENSION_TYPES:
            if self.size > MAX_EXTENSION_HEADER_BYTES:
                raise _Refused(f"holds an extension header (PAX or GNU long name) of "
                               f"{self.size} bytes, over {MAX_EXTENSION_HEADER_BYTES}")
            seen = archive.__dict__.get("_kubeinfer_extension_headers", 0) + 1
            if seen > MAX_EXTENSION_HEADERS:
                raise _Refused(f"holds more than {MAX_EXTENSION_HEADERS} extension headers "
                               "(PAX or GNU long name)")
            archive.__dict__["_kubeinfer_extension_headers"] = seen
        member: tarfile.TarInfo = super()._proc_member(archive)  # type: ignore[misc]
        return member

    def _proc_gnusparse_00(self, *args: Any) -> None:
        raise _Refused("holds a sparse file, which kubeinfer compile never writes")

    _proc_gnusparse_01 = _proc_gnusparse_00
    _proc_gnusparse_10 = _proc_gnusparse_00


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
    """Whether ``path`` opens as a tarball (its first member read within the bounds)."""
    if not path.is_file():
        return False
    try:
        with tarfile.open(path, "r:*", tarinfo=BoundedTarInfo):
            return True
    except _Refused:
        return True  # a tarball, and a hostile one: ``unpack`` says why
    except (tarfile.TarError, EOFError, OSError):
        return False


def unpack(src: Path, dest: Path) -> None:
    """Unpack ``src`` into the empty folder ``dest``; ArtifactError when it is not a safe bundle."""
    try:
        with tarfile.open(src, "r:*", tarinfo=BoundedTarInfo) as tar:
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
    except _Refused as e:
        raise ArtifactError(f"Artifact {src.name} {e}: refused (it is not a compiled "
                            "artifact's .tar.gz)") from None
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ArtifactError(f"Artifact {src.name} cannot be unpacked ({e}): it is not a "
                            "compiled artifact's .tar.gz, or it is damaged") from None
