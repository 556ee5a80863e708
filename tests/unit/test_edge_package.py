"""Edge packages: deterministic, signed, verified before extraction, extracted safely."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from kubeinfer_runtime.edge import package as pkg
from kubeinfer_runtime.edge import signing
from tests.support.onnx_models import add_3_model


@pytest.fixture
def keys() -> signing.KeyPair:
    return signing.generate()


def _build(tmp_path: Path, keys: signing.KeyPair, name: str = "p.tar.gz",
           model: Path | None = None) -> pkg.PackageReport:
    model = model or add_3_model(tmp_path / "m.onnx")
    return pkg.build(model, fleet="fleet", version="v1", target="rpi4", dest=tmp_path / name,
                     signing_key=keys.private_key)


def _verify(path: Path, report: pkg.PackageReport, public_key: str) -> None:
    pkg.verify_download(path, sha256=report.sha256, size=report.size,
                        signature=report.signature, public_key=public_key, fleet="fleet",
                        version="v1", target="rpi4")


def test_build_is_deterministic_and_verifies(tmp_path: Path, keys: signing.KeyPair) -> None:
    a = _build(tmp_path, keys, "a.tar.gz")
    b = _build(tmp_path, keys, "b.tar.gz")
    assert a.sha256 == b.sha256 and a.signature == b.signature
    assert a.publicKey == keys.public_key
    assert a.ref().sha256 == a.sha256
    _verify(tmp_path / "a.tar.gz", a, keys.public_key)
    manifest = pkg.extract(tmp_path / "a.tar.gz", tmp_path / "out")
    assert manifest.format == "onnx" and manifest.model == pkg.ONNX_NAME
    assert set(manifest.files) == {pkg.ONNX_NAME}
    with tarfile.open(tmp_path / "a.tar.gz") as tar:
        infos = tar.getmembers()
    assert [i.name for i in infos] == [pkg.PACKAGE_MANIFEST, pkg.ONNX_NAME]
    assert all(i.mtime == 0 and i.uid == 0 and i.uname == "" for i in infos)


def test_compiled_artifact_folder(tmp_path: Path, keys: signing.KeyPair) -> None:
    art = tmp_path / "artifact"
    art.mkdir()
    add_3_model(art / "model.onnx")
    (art / "manifest.json").write_text("{}")
    report = _build(tmp_path, keys, model=art)
    assert report.format == "compiled"
    manifest = pkg.extract(tmp_path / "p.tar.gz", tmp_path / "out")
    assert manifest.model == pkg.COMPILED_DIR
    assert set(manifest.files) == {"artifact/manifest.json", "artifact/model.onnx"}
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "x.bin").write_bytes(b"x")
    with pytest.raises(pkg.PackageError, match="not a compiled"):
        _build(tmp_path, keys, model=plain)


def test_tampered_byte_is_refused(tmp_path: Path, keys: signing.KeyPair) -> None:
    report = _build(tmp_path, keys)
    data = bytearray((tmp_path / "p.tar.gz").read_bytes())
    data[len(data) // 2] ^= 0x01
    (tmp_path / "p.tar.gz").write_bytes(bytes(data))
    with pytest.raises(pkg.PackageError, match="sha256"):
        _verify(tmp_path / "p.tar.gz", report, keys.public_key)


def test_truncated_is_refused(tmp_path: Path, keys: signing.KeyPair) -> None:
    report = _build(tmp_path, keys)
    data = (tmp_path / "p.tar.gz").read_bytes()
    (tmp_path / "p.tar.gz").write_bytes(data[:-10])
    with pytest.raises(pkg.PackageError, match="truncated"):
        _verify(tmp_path / "p.tar.gz", report, keys.public_key)


def test_wrong_key_is_refused(tmp_path: Path, keys: signing.KeyPair) -> None:
    report = _build(tmp_path, keys)
    with pytest.raises(signing.SignatureError):
        _verify(tmp_path / "p.tar.gz", report, signing.generate().public_key)


def _evil(tmp_path: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    path = tmp_path / "evil.tar.gz"
    body = json.dumps({"fleet": "f", "version": "v1", "target": "t", "format": "onnx",
                       "model": "model.onnx", "files": {}}).encode()
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(pkg.PACKAGE_MANIFEST)
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
        tar.addfile(member, io.BytesIO(data) if member.isreg() else None)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "",
            data: bytes = b"x") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info


@pytest.mark.parametrize("member,match", [
    (_member("../escape"), "unsafe path"),
    (_member("/abs/path"), "unsafe path"),
    (_member("a/../../escape"), "unsafe path"),
    (_member("link", tarfile.SYMTYPE, "/etc/passwd"), "link or special"),
    (_member("hard", tarfile.LNKTYPE, "manifest.json"), "link or special"),
    (_member("dev", tarfile.CHRTYPE), "link or special"),
    (_member("fifo", tarfile.FIFOTYPE), "link or special"),
    (_member("holes", tarfile.GNUTYPE_SPARSE), "sparse file"),
])
def test_unsafe_members_are_refused(tmp_path: Path, member: tarfile.TarInfo, match: str) -> None:
    evil = _evil(tmp_path, member, b"x")
    with pytest.raises(pkg.PackageError, match=match):
        pkg.extract(evil, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "escape").exists()


@pytest.mark.parametrize("kind", [tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
                                  tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK])
def test_a_huge_extension_header_is_refused_before_it_is_read(tmp_path: Path,
                                                               kind: bytes) -> None:
    """tarfile reads a PAX or GNU long-name header whole into memory: a signed package with a
    2 GiB one (a few MiB of gzip) would take 2 GiB. Refused on the declared size, before any
    read: this file declares 64 MiB and holds one header block, and no memory is spent."""
    header = tarfile.TarInfo("././@LongLink")
    header.type = kind
    header.size = 64 << 20
    path = tmp_path / "bomb.tar.gz"
    with gzip.open(path, "wb") as f:
        f.write(header.tobuf(tarfile.USTAR_FORMAT))
        f.write(b"\0" * tarfile.BLOCKSIZE * 4)
    with pytest.raises(pkg.PackageError, match=r"extension header .* of 67108864 bytes"):
        pkg.extract(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_long_names_within_the_bound_still_extract(tmp_path: Path,
                                                   keys: signing.KeyPair) -> None:
    # A compiled artifact whose file name needs a PAX header (over 100 characters).
    art = tmp_path / "artifact"
    art.mkdir()
    (art / "manifest.json").write_text("{}")
    (art / ("w" * 150 + ".bin")).write_bytes(b"weights")
    report = _build(tmp_path, keys, model=art)
    manifest = pkg.extract(Path(report.uri.removeprefix("file://")), tmp_path / "out")
    assert f"{pkg.COMPILED_DIR}/{'w' * 150}.bin" in manifest.files


def test_size_and_count_bounds(tmp_path: Path, keys: signing.KeyPair) -> None:
    _build(tmp_path, keys)
    with pytest.raises(pkg.PackageError, match="more than 10 bytes"):
        pkg.extract(tmp_path / "p.tar.gz", tmp_path / "out", max_bytes=10)
    with pytest.raises(pkg.PackageError, match="more than 1 members"):
        pkg.extract(tmp_path / "p.tar.gz", tmp_path / "out", max_members=1)


def test_file_not_in_manifest_or_wrong_hash(tmp_path: Path, keys: signing.KeyPair) -> None:
    evil = _evil(tmp_path, _member("model.onnx"), b"x")  # listed nowhere
    with pytest.raises(pkg.PackageError, match="differ from its manifest"):
        pkg.extract(evil, tmp_path / "out")
    _build(tmp_path, keys)
    pkg.extract(tmp_path / "p.tar.gz", tmp_path / "ok")
    with open(tmp_path / "ok" / pkg.ONNX_NAME, "ab") as f:
        f.write(b"\0")
    with pytest.raises(pkg.PackageError, match="does not match its sha256"):
        pkg.check_extracted(tmp_path / "ok")


def test_cli_keygen_and_package(tmp_path: Path) -> None:
    model = add_3_model(tmp_path / "m.onnx")
    run = [sys.executable, "-m", "kubeinfer_runtime", "edge"]
    out = subprocess.run([*run, "keygen", "--out", str(tmp_path / "keys")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    env_report = tmp_path / "report.json"
    out = subprocess.run(
        [*run, "package", "--fleet", "fleet", "--version", "v1", "--target", "rpi4",
         "--model", str(model), "--out", str(tmp_path / "pkgs"),
         "--signing-key-file", str(tmp_path / "keys" / "signing.key")],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "KUBEINFER_REPORT_FILE": str(env_report)})
    assert out.returncode == 0, out.stderr
    report = pkg.PackageReport.model_validate_json(out.stdout)
    assert report.uri == (tmp_path / "pkgs" / "v1" / "rpi4.tar.gz").as_uri()
    assert json.loads(env_report.read_text())["sha256"] == report.sha256
    assert report.publicKey == (tmp_path / "keys" / "signing.pub").read_text().strip()
    _verify(tmp_path / "pkgs" / "v1" / "rpi4.tar.gz", report, report.publicKey)
    bad = subprocess.run(
        [*run, "package", "--fleet", "fleet", "--version", "Bad/Version", "--target", "rpi4",
         "--model", str(model), "--out", str(tmp_path / "pkgs"),
         "--signing-key-file", str(tmp_path / "keys" / "signing.key")],
        capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "version" in bad.stderr
