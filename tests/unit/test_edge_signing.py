"""Edge package signatures: ed25519 over the fleet, version, target and sha256."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from kubeinfer_runtime.edge import signing

SHA = "ab" * 32


def test_sign_and_verify_roundtrip() -> None:
    pair = signing.generate()
    sig = signing.sign(pair.private_key, "fleet", "v1", "rpi4", SHA)
    signing.verify(pair.public_key, sig, "fleet", "v1", "rpi4", SHA)
    assert signing.public_of(pair.private_key) == pair.public_key
    assert len(base64.b64decode(pair.public_key)) == 32


@pytest.mark.parametrize("field", ["fleet", "version", "target", "sha256"])
def test_signature_covers_every_field(field: str) -> None:
    pair = signing.generate()
    args = {"fleet": "fleet", "version": "v1", "target": "rpi4", "sha256": SHA}
    sig = signing.sign(pair.private_key, **args)
    args[field] = "cd" * 32 if field == "sha256" else "other"
    with pytest.raises(signing.SignatureError, match="does not verify"):
        signing.verify(pair.public_key, sig, **args)


def test_wrong_key_is_refused_without_quoting_keys() -> None:
    a, b = signing.generate(), signing.generate()
    sig = signing.sign(a.private_key, "f", "v1", "t", SHA)
    with pytest.raises(signing.SignatureError) as e:
        signing.verify(b.public_key, sig, "f", "v1", "t", SHA)
    assert a.public_key not in e.value.message and b.public_key not in e.value.message


@pytest.mark.parametrize("bad", ["not base64!", base64.b64encode(b"short").decode()])
def test_malformed_keys_and_signatures(bad: str) -> None:
    pair = signing.generate()
    with pytest.raises(signing.SigningKeyError):
        signing.public_key(bad)
    with pytest.raises(signing.SigningKeyError):
        signing.sign(bad, "f", "v1", "t", SHA)
    with pytest.raises(signing.SignatureError):
        signing.verify(pair.public_key, bad, "f", "v1", "t", SHA)


def test_keys_from_env_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pair = signing.generate()
    priv, pub = signing.write_key_pair(tmp_path / "keys", pair)
    assert stat.S_IMODE(os.stat(priv).st_mode) == 0o600
    assert pub.read_text().strip() == pair.public_key
    assert signing.load_signing_key(priv) == pair.private_key
    monkeypatch.setenv(signing.SIGNING_KEY_ENV, pair.private_key)
    assert signing.load_signing_key() == pair.private_key
    monkeypatch.delenv(signing.SIGNING_KEY_ENV)
    with pytest.raises(signing.SigningKeyError, match="No signing key"):
        signing.load_signing_key()
    with pytest.raises(signing.SigningKeyError, match="cannot be read"):
        signing.load_signing_key(tmp_path / "missing")
    with pytest.raises(FileExistsError):  # keygen never overwrites a key
        signing.write_key_pair(tmp_path / "keys", signing.generate())
