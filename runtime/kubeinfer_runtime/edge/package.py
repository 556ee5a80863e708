"""Edge packages: one signed, deterministic ``.tar.gz`` per fleet version and device target.

A package holds ``manifest.json`` (``PackageManifest``: fleet, version, target,
format, the model's relative path and every file's sha256) and the model: an
``.onnx`` file (``model.onnx``) or a compiled artifact folder (``artifact/``,
the output of ``kubeinfer_runtime.compile``, served with ``format: compiled``).

The tarball is deterministic (members sorted, mtime 0, uid/gid 0, no names, a
gzip header without time or file name), so building the same input twice gives
the same sha256: a rebuilt version does not look like a new one.

Extraction is a decoder of untrusted bytes, and the agent runs it only after
the sha256 and the signature verified. It is still bounded and strict (a key
can leak): only regular files (and folders) with relative names, no ``..``, no
links or devices, a bounded member count and total size, every file hashed
against the manifest afterwards, and no file the manifest does not list.
``tarfile`` reads a PAX or GNU long-name extension header whole into memory
before it yields the member it describes, so those headers are bounded too
(``MAX_EXTENSION_HEADER_BYTES``, checked on the declared size, before reading).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kubeinfer_runtime.contract.edge import NAME_PATTERN, PackageRef
from kubeinfer_runtime.edge import signing
from kubeinfer_runtime.edge.errors import EdgeError

PACKAGE_MANIFEST = "manifest.json"
ONNX_NAME = "model.onnx"
COMPILED_DIR = "artifact"
#: Bounds of extraction (the agent may lower them); a package over one is refused.
MAX_MEMBERS = 4096
MAX_UNPACKED_BYTES = 8 << 30
MAX_MANIFEST_BYTES = 1 << 20
#: Largest PAX (``x``/``g``) or GNU long-name/link (``L``/``K``) header: ours hold a path.
MAX_EXTENSION_HEADER_BYTES = 1 << 20
_CHUNK = 1 << 20
_EXTENSION_TYPES = frozenset({tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
                              tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK})


class PackageError(EdgeError):
    """A package cannot be built, or is damaged, unsafe or not what it claims to be."""


class PackageManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fleet: str = Field(max_length=253)
    version: str = Field(pattern=NAME_PATTERN)
    target: str = Field(pattern=NAME_PATTERN)
    format: Literal["onnx", "compiled"]
    #: The model's path relative to the package root: a file (onnx) or a folder (compiled).
    model: str
    #: Every file of the package except the manifest: relative path -> sha256.
    files: dict[str, str]


class PackageReport(BaseModel):
    """What ``edge package`` prints: a ``PackageRef`` plus what a person needs to check it."""

    fleet: str
    version: str
    target: str
    format: Literal["onnx", "compiled"]
    uri: str
    sha256: str
    size: int
    signature: str
    publicKey: str

    def ref(self) -> PackageRef:
        return PackageRef(uri=self.uri, sha256=self.sha256, size=self.size,
                          signature=self.signature)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _model_files(model: Path, fmt: Literal["onnx", "compiled"]) -> list[tuple[str, Path]]:
    """(name in the package, source path) of every model file, sorted by name."""
    if fmt == "onnx":
        return [(ONNX_NAME, model)]
    out = []
    for path in sorted(model.rglob("*")):
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise PackageError(f"Artifact folder {model} holds {path.name!r}, which is not a "
                               "plain file: package the output of kubeinfer compile as is")
        if path.is_file():
            out.append((f"{COMPILED_DIR}/{path.relative_to(model).as_posix()}", path))
    if not any(name == f"{COMPILED_DIR}/{PACKAGE_MANIFEST}" for name, _ in out):
        raise PackageError(f"Folder {model} has no {PACKAGE_MANIFEST}: it is not a compiled "
                           "artifact (give an .onnx file or kubeinfer compile's artifact)")
    return out


def detect_format(model: Path) -> Literal["onnx", "compiled"]:
    if model.is_dir():
        return "compiled"
    if model.is_file():
        return "onnx"
    raise PackageError(f"Model {model} does not exist: fix --model")


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = 0o644
    info.type = tarfile.REGTYPE
    return info


def write_tarball(dest: Path, members: list[tuple[str, Path | bytes]]) -> None:
    """A deterministic .tar.gz of ``members`` (name, file or bytes), in the order given."""
    with open(dest, "wb") as raw, \
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, src in members:
            if isinstance(src, bytes):
                tar.addfile(_tarinfo(name, len(src)), io.BytesIO(src))
            else:
                with open(src, "rb") as f:
                    tar.addfile(_tarinfo(name, src.stat().st_size), f)


def build(model: Path, *, fleet: str, version: str, target: str, dest: Path,
          signing_key: str, fmt: Literal["onnx", "compiled"] | None = None) -> PackageReport:
    """Write the package of ``model`` (an .onnx file or an artifact folder) to ``dest`` and
    sign it. ``uri`` in the report is ``dest`` as ``file://``; callers publishing elsewhere
    replace it."""
    fmt = fmt or detect_format(model)
    files = _model_files(model, fmt)
    try:
        manifest = PackageManifest(
            fleet=fleet, version=version, target=target, format=fmt,
            model=ONNX_NAME if fmt == "onnx" else COMPILED_DIR,
            files={name: sha256_file(path) for name, path in files})
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}"
                             for err in e.errors())
        raise PackageError(f"Invalid package fields ({problems}): fix --fleet, --version or "
                           "--target") from None
    body = (json.dumps(manifest.model_dump(), sort_keys=True, indent=1) + "\n").encode()
    dest.parent.mkdir(parents=True, exist_ok=True)
    write_tarball(dest, [(PACKAGE_MANIFEST, body), *files])
    digest = sha256_file(dest)
    return PackageReport(
        fleet=fleet, version=version, target=target, format=fmt, uri=dest.resolve().as_uri(),
        sha256=digest, size=dest.stat().st_size,
        signature=signing.sign(signing_key, fleet, version, target, digest),
        publicKey=signing.public_of(signing_key))


# -- the agent's side ---------------------------------------------------------------------------


def verify_download(path: Path, *, sha256: str, size: int, signature: str, public_key: str,
                    fleet: str, version: str, target: str) -> None:
    """Check a downloaded package's size, sha256 and signature before anything reads it."""
    actual_size = path.stat().st_size
    if actual_size != size:
        raise PackageError(f"Package {version}/{target} is {actual_size} bytes, the fleet "
                           f"announced {size}: the download is truncated or was replaced")
    digest = sha256_file(path)
    if digest != sha256:
        raise PackageError(f"Package {version}/{target} has sha256 {digest[:12]}…, the fleet "
                           f"announced {sha256[:12]}…: the download was altered")
    signing.verify(public_key, signature, fleet, version, target, sha256)


class _BoundedTarInfo(tarfile.TarInfo):
    """A ``TarInfo`` that refuses an extension header over ``MAX_EXTENSION_HEADER_BYTES``
    before ``tarfile`` reads it (``_proc_member`` is where it would: ``_proc_pax`` and
    ``_proc_gnulong`` read the declared size in one call; a few MiB of gzip declare GiB)."""

    def _proc_member(self, archive: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _EXTENSION_TYPES and self.size > MAX_EXTENSION_HEADER_BYTES:
            raise PackageError(f"Package holds an extension header (PAX or GNU long name) "
                               f"of {self.size} bytes, over {MAX_EXTENSION_HEADER_BYTES}: "
                               "refused")
        # Private in tarfile (unchanged since Python 3.0) and absent from typeshed.
        member: tarfile.TarInfo = super()._proc_member(archive)  # type: ignore[misc]
        return member


def _safe_name(name: str) -> PurePosixPath:
    p = PurePosixPath(name)
    if not name or p.is_absolute() or ".." in p.parts or "\\" in name or "\0" in name:
        raise PackageError(f"Package member {name[:80]!r} has an unsafe path (absolute or "
                           "with ..): refused")
    parts = [part for part in p.parts if part != "."]
    if not parts:
        raise PackageError("Package member with an empty name: refused")
    return PurePosixPath(*parts)


def _members(tar: tarfile.TarFile, max_members: int,
             max_bytes: int) -> Iterator[tuple[tarfile.TarInfo, PurePosixPath]]:
    count = total = 0
    for info in tar:
        count += 1
        if count > max_members:
            raise PackageError(f"Package holds more than {max_members} members: refused")
        name = _safe_name(info.name)
        if info.isdir():
            continue
        if not info.isreg():
            raise PackageError(f"Package member {info.name[:80]!r} is a link or special file: "
                               "refused (packages hold plain files only)")
        if info.issparse():
            # tarfile expands a sparse member's holes while extracting: its bytes on disk
            # are not the stored ones. `edge package` never writes one.
            raise PackageError(f"Package member {info.name[:80]!r} is a sparse file: refused "
                               "(packages hold plain files only)")
        total += info.size
        if total > max_bytes:
            raise PackageError(f"Package unpacks to more than {max_bytes} bytes: refused")
        yield info, name


def extract(path: Path, dest: Path, *, max_members: int = MAX_MEMBERS,
            max_bytes: int = MAX_UNPACKED_BYTES) -> PackageManifest:
    """Extract the package at ``path`` into ``dest`` (emptied first) and check every file
    against its manifest. On any failure ``dest`` is removed and PackageError raised."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    try:
        seen: set[str] = set()
        with tarfile.open(path, "r:gz", tarinfo=_BoundedTarInfo) as tar:
            for info, name in _members(tar, max_members, max_bytes):
                key = name.as_posix()
                if key in seen:
                    raise PackageError(f"Package member {key[:80]!r} appears twice: refused")
                seen.add(key)
                out = dest.joinpath(*name.parts)
                out.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(info)
                if src is None:  # pragma: no cover - isreg() members always have a stream
                    raise PackageError(f"Package member {key[:80]!r} cannot be read")
                # O_EXCL + O_NOFOLLOW: a name that resolved through something already
                # written (it cannot: no links are written) still never writes outside.
                fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
                with os.fdopen(fd, "wb") as f:
                    shutil.copyfileobj(src, f, _CHUNK)
        return check_extracted(dest, seen)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        shutil.rmtree(dest, ignore_errors=True)
        raise PackageError(f"Package {path.name} cannot be unpacked ({type(e).__name__}): it "
                           "is damaged") from None
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


def read_manifest(root: Path) -> PackageManifest:
    path = root / PACKAGE_MANIFEST
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise PackageError(f"Package {PACKAGE_MANIFEST} is over {MAX_MANIFEST_BYTES} bytes")
        return PackageManifest.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        raise PackageError(f"Package has no {PACKAGE_MANIFEST}: it is not an edge package") \
            from None
    except ValidationError as e:
        raise PackageError(f"Package {PACKAGE_MANIFEST} is invalid ({e.error_count()} "
                           "problem(s)): rebuild it with `edge package`") from None


def check_extracted(root: Path, names: set[str] | None = None) -> PackageManifest:
    """The manifest of the extracted package at ``root``, after checking that exactly the
    files it lists are there, with their sha256. Also used on restart, so a half-extracted
    or altered slot is never served."""
    manifest = read_manifest(root)
    if names is None:
        names = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    listed = set(manifest.files) | {PACKAGE_MANIFEST}
    if names != listed:
        extra = sorted(names - listed)[:3]
        missing = sorted(listed - names)[:3]
        raise PackageError(f"Package files differ from its manifest (extra {extra}, missing "
                           f"{missing}): rebuild it with `edge package`")
    for rel, digest in manifest.files.items():
        _safe_name(rel)
        if sha256_file(root / rel) != digest:
            raise PackageError(f"Package file {rel[:80]!r} does not match its sha256 in the "
                               "manifest: the package is damaged")
    model = root / _safe_name(manifest.model)
    if (manifest.format == "onnx" and not model.is_file()) or \
            (manifest.format == "compiled" and not (model / PACKAGE_MANIFEST).is_file()):
        raise PackageError(f"Package model {manifest.model[:80]!r} is not a {manifest.format} "
                           "model in the package")
    return manifest
