"""The credentials a gateway accepts from its callers, read from a directory.

On Kubernetes the directory is a mounted Secret (one file per key); in local
mode it is ``~/.kubeinfer/secrets/<name>/`` with the same layout, so one loader
serves both. Recognised files:

- ``AWS_ACCESS_KEY_ID`` + ``AWS_SECRET_ACCESS_KEY``: one SigV4 key pair, the
  names boto3 reads from the environment, so a Secret made for a client works;
- ``credentials``: an AWS shared-credentials file; every section adds a pair,
  which is how two keys stay valid while callers rotate from one to the other;
- ``token`` (one bearer token) and ``tokens`` (one per line, ``#`` comments).

Other names are ignored, as are names starting with ``.``: kubelet's Secret
volumes hold ``..data`` and ``..<timestamp>`` entries beside the keys.

Secrets never leave this module in clear except as the ``keys`` mapping the
signer needs: bearer tokens are kept as SHA-256 digests only, ``repr`` shows
access key ids and counts, and every error names the file and what is wrong
with it, never the bytes it holds.
"""

from __future__ import annotations

import configparser
import hashlib
import logging
import os
import re
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

log = logging.getLogger("kubeinfer.gateway")

#: Largest credentials file read, bytes: a Secret holds a few keys, not data.
MAX_FILE_BYTES = 64 * 1024
#: Access key ids are letters and digits (AWS: 16-128 upper-case; be lenient).
ACCESS_KEY_ID = re.compile(r"[A-Za-z0-9]{3,128}")
#: A bearer token is one visible-ASCII word (RFC 6750 allows less; be lenient).
_TOKEN = re.compile(rb"[\x21-\x7e]+")
_KEY_ID_FILE = "AWS_ACCESS_KEY_ID"
_SECRET_FILE = "AWS_SECRET_ACCESS_KEY"
_SHARED_FILE = "credentials"
_TOKEN_FILE = "token"
_TOKENS_FILE = "tokens"
KNOWN_FILES = (_KEY_ID_FILE, _SECRET_FILE, _SHARED_FILE, _TOKEN_FILE, _TOKENS_FILE)
#: kubelet swaps this symlink to publish a Secret update atomically.
_KUBELET_DATA = "..data"
_LOCAL_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


class CredentialsError(Exception):
    """A credentials file is unusable; the message names it and never quotes it."""


def token_digest(token: bytes) -> bytes:
    """What is kept of a bearer token: its SHA-256."""
    return hashlib.sha256(token).digest()


@dataclass(frozen=True)
class CallerCredentials:
    """Access key pairs and bearer-token digests the gateway accepts."""

    #: access key id -> secret access key (read-only).
    keys: Mapping[str, str]
    #: SHA-256 of each accepted bearer token.
    token_digests: tuple[bytes, ...]

    @property
    def empty(self) -> bool:
        return not self.keys and not self.token_digests

    def __repr__(self) -> str:
        # Never the secrets, not even their digests (a weak token is guessable from one).
        return (f"CallerCredentials(access_key_ids={sorted(self.keys)!r}, "
                f"tokens={len(self.token_digests)})")


def _read(path: Path) -> bytes:
    """The file's bytes, bounded; errors name the file and what is wrong."""
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            # A FIFO or device would block or never end: only plain files are read.
            kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
            raise CredentialsError(f"Credentials file {path} is {kind}: make it a file "
                                   "(one Secret key)")
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise CredentialsError(f"Cannot read credentials file {path}: {exc.strerror}") from None
    if len(data) > MAX_FILE_BYTES:
        raise CredentialsError(f"Credentials file {path} is larger than "
                               f"{MAX_FILE_BYTES // 1024} KiB: a credentials file holds a few "
                               "keys, check what was mounted")
    return data


def _text(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CredentialsError(f"Credentials file {path} is not UTF-8 text (byte "
                               f"{exc.start}): save it as plain text") from None


def _check_key_id(where: str, key_id: str) -> None:
    if not ACCESS_KEY_ID.fullmatch(key_id):
        # Describe it, never quote it: a secret pasted into the wrong file must not leak.
        raise CredentialsError(
            f"Credentials file {where}: the access key id must be 3 to 128 letters or "
            f"digits, found {len(key_id)} characters: check that the id (not the secret) "
            "is in this place")


def _check_secret(where: str, secret: str) -> None:
    if not secret:
        raise CredentialsError(f"Credentials file {where}: the secret access key is empty: "
                               "set it")
    if any(c.isspace() or not c.isprintable() for c in secret):
        raise CredentialsError(f"Credentials file {where}: the secret access key contains "
                               "whitespace or control characters: put the key alone on one line")


class _Builder:
    """Collects pairs and tokens from several files, refusing conflicts."""

    def __init__(self) -> None:
        self.keys: dict[str, str] = {}
        self.origin: dict[str, str] = {}
        self.digests: list[bytes] = []

    def add_pair(self, where: str, key_id: str, secret: str) -> None:
        _check_key_id(where, key_id)
        _check_secret(where, secret)
        known = self.keys.get(key_id)
        if known is not None and known != secret:
            raise CredentialsError(
                f"Access key id {key_id} has two different secrets (in {self.origin[key_id]} "
                f"and {where}): keep one secret per access key id")
        self.keys[key_id] = secret
        self.origin.setdefault(key_id, where)

    def add_token(self, where: str, token: bytes) -> None:
        if not _TOKEN.fullmatch(token):
            raise CredentialsError(f"Credentials file {where}: a bearer token must be one word "
                                   "of visible ASCII characters (no spaces): fix or regenerate "
                                   "it")
        digest = token_digest(token)
        if digest not in self.digests:
            self.digests.append(digest)


def _load_pair(directory: Path, names: set[str], out: _Builder) -> None:
    has_id, has_secret = _KEY_ID_FILE in names, _SECRET_FILE in names
    if not has_id and not has_secret:
        return
    if has_id != has_secret:
        present, absent = ((_KEY_ID_FILE, _SECRET_FILE) if has_id
                           else (_SECRET_FILE, _KEY_ID_FILE))
        raise CredentialsError(f"Credentials directory {directory} has {present} but no "
                               f"{absent}: add the other half of the key pair, or remove this "
                               "one")
    id_path, secret_path = directory / _KEY_ID_FILE, directory / _SECRET_FILE
    key_id = _text(id_path, _read(id_path)).strip()
    secret = _text(secret_path, _read(secret_path)).strip()
    if not key_id:
        raise CredentialsError(f"Credentials file {id_path} is empty: set the access key id")
    _check_secret(str(secret_path), secret)
    out.add_pair(str(id_path), key_id, secret)


def _load_shared(path: Path, out: _Builder) -> None:
    # No interpolation: secrets may contain '%'. No DEFAULT section either: AWS
    # files treat every section, [DEFAULT] included, as one profile.
    parser = configparser.ConfigParser(interpolation=None, default_section="\0none")
    try:
        parser.read_string(_text(path, _read(path)), source=str(path))
    except configparser.Error as exc:
        # configparser quotes the offending line, which may hold a secret: give only numbers.
        lines = [str(n) for n, _ in getattr(exc, "errors", [])]
        lineno = getattr(exc, "lineno", None)
        if not lines and lineno is not None:
            lines = [str(lineno)]
        at = f" at line {', '.join(lines)}" if lines else ""
        raise CredentialsError(
            f"Credentials file {path} is not a valid AWS credentials file{at} "
            f"({type(exc).__name__}): "
            "write [profile] sections of aws_access_key_id = ... and "
            "aws_secret_access_key = ... lines") from None
    if not parser.sections():
        raise CredentialsError(f"Credentials file {path} has no [profile] section: add one "
                               "holding aws_access_key_id and aws_secret_access_key")
    for section in parser.sections():
        where = f"Credentials file {path} [{section}]"
        key_id = parser.get(section, "aws_access_key_id", fallback="").strip()
        secret = parser.get(section, "aws_secret_access_key", fallback="").strip()
        if not key_id or not secret:
            missing = "aws_access_key_id" if not key_id else "aws_secret_access_key"
            raise CredentialsError(f"Credentials file {where} has no (or an empty) {missing}: "
                                   "every section must hold one access key id and its secret")
        out.add_pair(where, key_id, secret)


def _load_tokens(directory: Path, names: set[str], out: _Builder) -> None:
    if _TOKEN_FILE in names:
        path = directory / _TOKEN_FILE
        token = _read(path).strip()
        if not token:
            raise CredentialsError(f"Credentials file {path} is empty: put the bearer token "
                                   "in it")
        out.add_token(str(path), token)
    if _TOKENS_FILE in names:
        path = directory / _TOKENS_FILE
        # An empty list is allowed: it revokes every token of the file.
        for number, line in enumerate(_read(path).splitlines(), start=1):
            line = line.strip()
            if line and not line.startswith(b"#"):
                out.add_token(f"Credentials file {path} line {number}", line)


def load_credentials(directory: Path) -> CallerCredentials:
    """Every pair and token in ``directory``; CredentialsError if anything is unusable.

    A directory holding none of the recognised files gives empty credentials
    (every caller refused), not an error: emptying the Secret revokes access.
    """
    try:
        # Dangling links are absent keys: kubelet removes a deleted key's link
        # just after swapping ..data.
        names = {n for n in os.listdir(directory)
                 if not n.startswith(".") and os.path.exists(directory / n)}
    except FileNotFoundError:
        raise CredentialsError(f"Credentials directory {directory} does not exist: "
                               "create it or mount the Secret there") from None
    except OSError as exc:
        raise CredentialsError(f"Cannot list credentials directory {directory}: "
                               f"{exc.strerror}") from None
    out = _Builder()
    _load_pair(directory, names, out)
    if _SHARED_FILE in names:
        _load_shared(directory / _SHARED_FILE, out)
    _load_tokens(directory, names, out)
    return CallerCredentials(MappingProxyType(dict(out.keys)), tuple(out.digests))


Signature = tuple[tuple[str, int, int, int], ...]


def directory_signature(directory: Path) -> Signature | None:
    """What changes when any credentials file changes; None if the directory is gone.

    Entries are stat'ed through their symlinks (kubelet's keys point into
    ``..data``), and ``..data`` itself is lstat'ed: kubelet publishes an update
    by swapping that one link.
    """
    entries: list[tuple[str, int, int, int]] = []
    try:
        with os.scandir(directory) as it:
            for entry in it:
                if entry.name.startswith(".") and entry.name != _KUBELET_DATA:
                    continue
                try:
                    st = entry.stat(follow_symlinks=entry.name != _KUBELET_DATA)
                except OSError:
                    st = None  # a dangling link: still an entry whose change matters
                entries.append((entry.name, st.st_ino if st else -1, st.st_size if st else -1,
                                st.st_mtime_ns if st else -1))
    except (FileNotFoundError, NotADirectoryError):
        return None
    entries.sort()
    return tuple(entries)


class CredentialsDirectory:
    """The credentials in one directory, re-read when it changes.

    :meth:`current` is called on the request path, so it looks at the
    directory at most every ``interval_s`` seconds (kubelet itself takes up to
    a minute to publish a Secret update) and re-reads files only when their
    signature changed. A change that does not load keeps the last good
    credentials and is logged once; a directory that is missing or unreadable
    gives None, which the authenticator answers with 503 (fail closed).
    """

    def __init__(self, directory: Path, *, interval_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.directory = directory
        self.interval_s = interval_s
        self.clock = clock
        self._credentials: CallerCredentials | None = None
        self._signature: Signature | None = None
        self._next_look = float("-inf")
        self._reported: str | None = None

    def current(self) -> CallerCredentials | None:
        now = self.clock()
        if now >= self._next_look:
            self._next_look = now + self.interval_s
            self._refresh()
        return self._credentials

    def _refresh(self) -> None:
        try:
            signature = directory_signature(self.directory)
        except OSError as exc:
            self._unavailable(f"Cannot read credentials directory {self.directory}: "
                              f"{exc.strerror}: check the Secret volume and its permissions; "
                              "every request is refused with 503 meanwhile")
            return
        if signature is None:
            self._unavailable(f"Credentials directory {self.directory} does not exist: mount "
                              "the Secret there; every request is refused with 503 meanwhile")
            return
        if signature == self._signature:
            return
        # Whatever the outcome, read again only when the directory changes again.
        self._signature = signature
        try:
            loaded = load_credentials(self.directory)
        except CredentialsError as exc:
            keeping = ("keeping the credentials loaded before" if self._credentials is not None
                       else "no credentials loaded yet, every request is refused with 503")
            self._report(f"{exc}; {keeping}")
            return
        self._credentials = loaded
        self._reported = None
        if loaded.empty:
            log.warning("Credentials directory %s holds no credentials (expected %s): every "
                        "caller is refused", self.directory, ", ".join(KNOWN_FILES))
        else:
            log.info("Loaded caller credentials from %s: %d access key(s), %d token(s)",
                     self.directory, len(loaded.keys), len(loaded.token_digests))

    def _unavailable(self, message: str) -> None:
        self._credentials = None
        # When it comes back, load it afresh even if it looks the same.
        self._signature = None
        self._report(message)

    def _report(self, message: str) -> None:
        if message != self._reported:
            log.error("%s", message)
            self._reported = message
