"""Ed25519 signatures of edge packages: who built a package is checked, not only its bytes.

A sha256 alone proves a download is what the fleet server announced, but the
server (or whoever can write its config) could announce anything. The package
builder signs ``contract.edge.signing_payload(fleet, version, target, sha256)``
with a private key that never leaves the build side; the agent verifies it
with the public key it pinned at registration, before extracting anything.

Keys are raw 32-byte ed25519 keys as base64 text: one line in a file or in
``KUBEINFER_EDGE_SIGNING_KEY``. Errors name what failed, never key bytes.
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from kubeinfer_runtime.contract.edge import signing_payload
from kubeinfer_runtime.edge.errors import EdgeError

#: Env var holding the base64 private key (the package builder's).
SIGNING_KEY_ENV = "KUBEINFER_EDGE_SIGNING_KEY"
KEY_BYTES = 32
SIGNATURE_BYTES = 64


class SigningKeyError(EdgeError):
    """A key is missing, not base64, or not a raw 32-byte ed25519 key."""


class SignatureError(EdgeError):
    """A signature is malformed or does not match the package it claims to cover."""


@dataclass(frozen=True)
class KeyPair:
    """Base64 text of a raw ed25519 key pair."""

    private_key: str
    public_key: str


def generate() -> KeyPair:
    key = Ed25519PrivateKey.generate()
    return KeyPair(private_key=_b64(key.private_bytes_raw()),
                   public_key=_b64(key.public_key().public_bytes_raw()))


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _decode_key(text: str, what: str) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise SigningKeyError(f"The {what} is not base64: give the text that keygen "
                              "wrote") from None
    if len(raw) != KEY_BYTES:
        raise SigningKeyError(f"The {what} is {len(raw)} bytes, not a raw {KEY_BYTES}-byte "
                        "ed25519 key: give the text that keygen wrote")
    return raw


def private_key(text: str) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(_decode_key(text, "signing key"))


def public_key(text: str) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(_decode_key(text, "public key"))


def public_of(private_text: str) -> str:
    """The base64 public key of a base64 private key."""
    return _b64(private_key(private_text).public_key().public_bytes(
        Encoding.Raw, PublicFormat.Raw))


def load_signing_key(path: str | Path | None = None) -> str:
    """The base64 private key: from ``path`` when given, else ``KUBEINFER_EDGE_SIGNING_KEY``."""
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise SigningKeyError(f"Signing key file {path} cannot be read ({e.strerror}): run "
                            "`edge keygen` or fix --signing-key-file") from None
    else:
        text = os.environ.get(SIGNING_KEY_ENV, "")
        if not text.strip():
            raise SigningKeyError(f"No signing key: set {SIGNING_KEY_ENV} or pass "
                            "--signing-key-file (create one with `edge keygen`)")
    private_key(text)  # validate now: a bad key fails before any work is done
    return text.strip()


def sign(private_text: str, fleet: str, version: str, target: str, sha256: str) -> str:
    """Base64 signature of the package's ``signing_payload``."""
    key = private_key(private_text)
    return _b64(key.sign(signing_payload(fleet, version, target, sha256)))


def verify(public_text: str, signature: str, fleet: str, version: str, target: str,
           sha256: str) -> None:
    """Raise ``SignatureError`` (or ``SigningKeyError`` for a bad key) unless ``signature`` covers
    exactly this fleet, version, target and sha256 under ``public_text``."""
    key = public_key(public_text)
    try:
        raw = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError(f"Signature of package {version}/{target} is not base64") from None
    if len(raw) != SIGNATURE_BYTES:
        raise SignatureError(f"Signature of package {version}/{target} is {len(raw)} bytes, "
                             f"not {SIGNATURE_BYTES}")
    try:
        key.verify(raw, signing_payload(fleet, version, target, sha256))
    except InvalidSignature:
        raise SignatureError(
            f"Signature of package {version}/{target} does not verify with the pinned public "
            "key: the package was not signed by the fleet's key for this fleet, version, "
            "target and sha256") from None


def write_key_pair(directory: Path, pair: KeyPair) -> tuple[Path, Path]:
    """``signing.key`` (0600, created that way: never readable by others, even briefly) and
    ``signing.pub`` in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    priv = directory / "signing.key"
    pub = directory / "signing.pub"
    fd = os.open(priv, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(pair.private_key + "\n")
    pub.write_text(pair.public_key + "\n")
    return priv, pub
