"""Who may call the gateway: SigV4 as boto3 signs, or a bearer token: PURE.

SageMaker authenticates every InvokeEndpoint call with AWS Signature V4, so
boto3's ``sagemaker-runtime`` client and the SageMaker Python SDK work against
the gateway unchanged once they are given a key pair from the Endpoint's
credentials Secret. Clients that cannot sign use ``Authorization: Bearer``.

The signature is computed with botocore's own signer rather than a copy of
the algorithm: the server must reproduce the client's canonical request byte
for byte (including botocore's double percent-encoding of the path and its
handling of the query string), and botocore is where that behaviour is kept.
Two things differ from signing: the headers signed are exactly those the
client listed (botocore would choose its own and skip a blacklist), and the
timestamp is the request's, not now. Derived signing keys are cached, so a
request costs one HMAC instead of five.

Failures are answered as AWS answers them (the error codes boto3 reports),
describe what is wrong without quoting the request's bytes, and fail closed:
no credentials configured is a 503, never an open door.
"""

from __future__ import annotations

import calendar
import datetime
import functools
import hashlib
import hmac
import logging
import re
import time
from collections.abc import Callable, Sequence
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING

from kubeinfer_runtime.contract.auth import MAX_CLOCK_SKEW_S, SIGNING_SERVICE, AuthMode
from kubeinfer_runtime.errors import Internal, NotReady, RuntimeServiceError
from kubeinfer_runtime.gateway.credentials import (
    ACCESS_KEY_ID,
    CallerCredentials,
    token_digest,
)

if TYPE_CHECKING:
    from types import ModuleType


class SignedHeaders(dict[str, list[str]]):
    """The client's signed headers, in the shape botocore's signer reads.

    ``canonical_headers`` and ``signed_headers`` only iterate the names and
    call ``get_all``; botocore's own ``HTTPHeaders`` (an ``email.message``)
    would cost a third of the whole check.
    """

    def get_all(self, name: str) -> list[str]:
        return self[name]


def sigv4_module() -> ModuleType:
    from kubeinfer_runtime.gateway import sigv4

    return sigv4

log = logging.getLogger("kubeinfer.gateway")

ALGORITHM = "AWS4-HMAC-SHA256"
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
#: Signing keys kept (one per secret, day, region and service in use).
KEY_CACHE_SIZE = 512

_AUTHORIZATION = b"authorization"
_AMZ_DATE = b"x-amz-date"
_DATE = b"date"
_CONTENT_SHA256 = b"x-amz-content-sha256"
_AMZ_DATE_FORMAT = re.compile(r"(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})(\d{2})Z")
_SCOPE_PART = re.compile(r"[A-Za-z0-9._-]{1,64}")
_HEADER_NAME = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]{1,128}")
_SIGNATURE = re.compile(r"[0-9a-f]{64}")
_SCOPE_DATE = re.compile(r"\d{8}")
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
_MAX_SIGNED_HEADERS = 64


__all__ = [
    "AccessDenied", "AuthMode", "Authenticator", "CredentialsNotConfigured",
    "IncompleteSignature", "InvalidSignature", "MissingAuthenticationToken",
    "UnrecognizedClient",
]


class MissingAuthenticationToken(RuntimeServiceError):
    """No credentials at all (403 for SigV4 as AWS answers, 401 for a bearer token)."""

    def __init__(self, message: str, *, status: int = 403,
                 headers: list[tuple[bytes, bytes]] | None = None) -> None:
        super().__init__(status, "MissingAuthenticationTokenException", message, headers=headers)


class IncompleteSignature(RuntimeServiceError):
    """The Authorization header or a header it needs is malformed or missing (400)."""

    def __init__(self, message: str) -> None:
        super().__init__(400, "IncompleteSignatureException", message)


class UnrecognizedClient(RuntimeServiceError):
    """The access key id is not one the endpoint accepts (403)."""

    def __init__(self, message: str) -> None:
        super().__init__(403, "UnrecognizedClientException", message)


class InvalidSignature(RuntimeServiceError):
    """The signature does not match, or is out of date or out of scope (403)."""

    def __init__(self, message: str) -> None:
        super().__init__(403, "InvalidSignatureException", message)


class AccessDenied(RuntimeServiceError):
    """Authenticated but not allowed, or a wrong bearer token (403)."""

    def __init__(self, message: str) -> None:
        super().__init__(403, "AccessDeniedException", message)


class CredentialsNotConfigured(NotReady):
    """The gateway has no credentials to check callers against (503, fail closed)."""


def _header_values(headers: Sequence[tuple[bytes, bytes]]) -> dict[bytes, list[bytes]]:
    values: dict[bytes, list[bytes]] = {}
    for name, value in headers:
        values.setdefault(name.lower(), []).append(value)
    return values


def _timestamp(values: dict[bytes, list[bytes]]) -> tuple[str, float] | None:
    """The request's time as ``YYYYMMDDTHHMMSSZ`` and epoch seconds, from X-Amz-Date or Date.

    X-Amz-Date wins when both are sent, as on AWS; botocore signs a Date
    header's time in the X-Amz-Date format, so that is what is returned.
    """
    amz = values.get(_AMZ_DATE)
    try:
        if amz:
            match = _AMZ_DATE_FORMAT.fullmatch(amz[0].decode("latin-1").strip())
            if match is None:
                return None
            y, mo, d, h, mi, s = (int(g) for g in match.groups())
            if not (y >= 1970 and 1 <= mo <= 12 and 1 <= d <= 31 and h < 24 and mi < 60
                    and s < 61):
                return None
            return match.group(0), float(calendar.timegm((y, mo, d, h, mi, s, 0, 0, 0)))
        date = values.get(_DATE)
        if not date:
            return None
        parsed = parsedate_to_datetime(date[0].decode("latin-1"))
        if parsed.tzinfo is None:
            # "-0000", which botocore writes: HTTP dates are UTC.
            parsed = parsed.replace(tzinfo=datetime.UTC)
        epoch = parsed.timestamp()
        return _stamp(epoch), epoch
    except (TypeError, ValueError, IndexError, OverflowError, OSError):
        return None


def _stamp(epoch: float) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(epoch))


def _skew_text(seconds: float) -> str:
    return f"{seconds / 60:g} min." if seconds % 60 == 0 else f"{seconds:g} s"


class Authenticator:
    """Checks one request's caller against the endpoint's credentials.

    ``credentials`` is asked on every request (a ``CredentialsDirectory``'s
    ``current``), so a rotated Secret applies without a restart. ``regions``
    restricts the region a signature may be scoped to (None or empty: any).
    ``AuthMode`` is the route table's (``contract.auth``), re-exported here.
    """

    def __init__(self, mode: AuthMode, credentials: Callable[[], CallerCredentials | None], *,
                 service: str = SIGNING_SERVICE, regions: frozenset[str] | None = None,
                 max_skew_s: float = MAX_CLOCK_SKEW_S,
                 clock: Callable[[], float] = time.time) -> None:
        self.mode = AuthMode(mode)
        self.credentials = credentials
        self.service = service
        # Empty means unrestricted, as in the route table (AuthRoute.regions).
        self.regions = regions or None
        self.max_skew_s = max_skew_s
        self.clock = clock
        # botocore (a few hundred ms to import) only when a SigV4 endpoint is served;
        # the key cache is per instance, so it dies with the gateway's configuration.
        self._sigv4 = sigv4_module() if self.mode is AuthMode.SIGV4 else None
        self._signing_key = (functools.lru_cache(maxsize=KEY_CACHE_SIZE)(
            self._sigv4.derive_signing_key) if self._sigv4 is not None else None)

    def check(self, method: bytes, target: bytes, headers: Sequence[tuple[bytes, bytes]],
              body: bytes) -> RuntimeServiceError | None:
        """None if the caller is authenticated, else the error to answer.

        ``target`` is the request target as received: the still percent-encoded
        path (ASGI ``raw_path``) plus ``?`` and the query string if there is one.
        ``headers`` are (name, value) pairs as the server parsed them.
        """
        if self.mode is AuthMode.NONE:
            return None
        try:
            if self.mode is AuthMode.TOKEN:
                return self._check_token(headers)
            return self._check_sigv4(method, target, headers, body)
        except Exception:
            # Fail closed, and say it is ours: no input may make this path raise.
            log.exception("Verifying a caller failed unexpectedly: the request is refused")
            return Internal("The gateway failed to verify the request's credentials: retry; "
                            "report a bug if it persists")

    # -- bearer tokens

    def _check_token(self, headers: Sequence[tuple[bytes, bytes]]) -> RuntimeServiceError | None:
        auth = _header_values(headers).get(_AUTHORIZATION)
        parts = auth[0].split(None, 1) if auth else []
        token = parts[1].strip() if len(parts) == 2 else b""
        if not parts or parts[0].lower() != b"bearer" or not token:
            return MissingAuthenticationToken(
                "Missing bearer token: this endpoint authenticates callers with a token "
                "(auth: Token); send the header Authorization: Bearer <token> with a token "
                "from the endpoint's credentials Secret",
                status=401, headers=[(b"www-authenticate", b"Bearer")])
        creds = self.credentials()
        if creds is None:
            return self._not_configured()
        digest = token_digest(token)
        # Compare against every digest, without stopping at the first match.
        matched = False
        for known in creds.token_digests:
            matched |= hmac.compare_digest(digest, known)
        if not matched:
            return AccessDenied("The bearer token is not valid for this endpoint: use a token "
                                "listed in the endpoint's credentials Secret")
        return None

    def _not_configured(self) -> RuntimeServiceError:
        return CredentialsNotConfigured(
            f"The endpoint's caller credentials are not configured (auth: {self.mode}): "
            "every request is refused until its credentials Secret is mounted and valid; "
            "see the gateway's log")

    # -- SigV4

    def _check_sigv4(self, method: bytes, target: bytes,
                     headers: Sequence[tuple[bytes, bytes]],
                     body: bytes) -> RuntimeServiceError | None:
        values = _header_values(headers)
        auth = values.get(_AUTHORIZATION)
        if not auth or not auth[0].strip():
            return MissingAuthenticationToken(
                "Missing Authentication Token: this endpoint authenticates callers with SigV4 "
                "(auth: SigV4); sign the request with an access key from the endpoint's "
                "credentials Secret (boto3 does when given credentials)")
        parsed = _parse_authorization(auth[0].decode("latin-1"))
        if isinstance(parsed, RuntimeServiceError):
            return parsed
        key_id, scope_date, region, service, signed_names, signature = parsed
        if self.regions is not None and region not in self.regions:
            return InvalidSignature(
                f"Credential should be scoped to a valid region, not '{region}': this "
                f"endpoint accepts {', '.join(sorted(self.regions))}; "
                "set the client's region_name to one of them")
        if service != self.service:
            return InvalidSignature(f"Credential should be scoped to correct service: "
                                    f"'{self.service}'; sign for service '{self.service}'")
        stamp = _timestamp(values)
        if stamp is None:
            return IncompleteSignature(
                "Authorization header requires existence of either a 'X-Amz-Date' or a "
                "'Date' header in a valid format (X-Amz-Date: YYYYMMDDTHHMMSSZ): sign with an "
                "SDK, which sends one")
        amz_date, epoch = stamp
        if scope_date != amz_date[:8]:
            return InvalidSignature(
                f"Date in Credential scope does not match YYYYMMDD from ISO-8601 version of "
                f"date from HTTP: '{scope_date}' != '{amz_date[:8]}'")
        creds = self.credentials()
        if creds is None:
            return self._not_configured()
        secret = creds.keys.get(key_id)
        if secret is None:
            return UnrecognizedClient(
                "The security token included in the request is invalid: the access key id "
                "is not one of this endpoint's; use a key from its credentials Secret")
        now = self.clock()
        if epoch < now - self.max_skew_s:
            return InvalidSignature(
                f"Signature expired: {amz_date} is now earlier than "
                f"{_stamp(now - self.max_skew_s)} ({_stamp(now)} - "
                f"{_skew_text(self.max_skew_s)}): check the client's clock")
        if epoch > now + self.max_skew_s:
            return InvalidSignature(
                f"Signature not yet current: {amz_date} is still later than "
                f"{_stamp(now + self.max_skew_s)} ({_stamp(now)} + "
                f"{_skew_text(self.max_skew_s)}): check the client's clock")
        body_hash = hashlib.sha256(body).hexdigest()
        claimed = values.get(_CONTENT_SHA256)
        payload_hash = body_hash
        if claimed:
            payload_hash = claimed[0].decode("latin-1").strip()
            if payload_hash != UNSIGNED_PAYLOAD and not (
                    _SHA256_HEX.fullmatch(payload_hash) and payload_hash.lower() == body_hash):
                return InvalidSignature(
                    "The X-Amz-Content-SHA256 header does not match the request body: send "
                    "the body's SHA-256 in hex, or UNSIGNED-PAYLOAD")
        signed = SignedHeaders()
        for name in signed_names:
            got = values.get(name.encode("latin-1"))
            if not got:
                # The name matched _HEADER_NAME: a plain token, safe to show.
                return IncompleteSignature(f"Signed header '{name}' is not in the request: "
                                           "sign only headers that are sent")
            signed[name] = [value.decode("latin-1") for value in got]
        path_error = _check_target(target)
        if path_error is not None:
            return path_error
        url = "http://" + signed["host"][0] + target.decode("latin-1")
        assert self._sigv4 is not None and self._signing_key is not None
        request = self._sigv4.AWSRequest(method=method.decode("latin-1"), url=url, data=body)
        request.context["timestamp"] = amz_date
        signer = self._sigv4.ClientSigner(signed, region, service, payload_hash,
                                          self._signing_key(secret, scope_date, region, service))
        try:
            canonical = signer.canonical_request(request)
        except ValueError:  # urlsplit refuses some malformed hosts
            return _mismatch()
        expected = signer.signature(signer.string_to_sign(request, canonical), request)
        if not hmac.compare_digest(expected.encode(), signature.encode()):
            return _mismatch()
        return None


def _mismatch() -> InvalidSignature:
    return InvalidSignature("The request signature we calculated does not match the signature "
                            "you provided. Check your AWS Secret Access Key and signing method")


def _check_target(target: bytes) -> RuntimeServiceError | None:
    """Refuse targets whose canonical form differs from what the gateway routes.

    The canonical URI drops dot segments and empty segments, so without this a
    signature for ``/endpoints/b/invocations`` would also verify for
    ``/endpoints/a/../b/invocations``. SDKs never send such paths.
    """
    path = target.split(b"?", 1)[0].decode("latin-1")
    if (not path.startswith("/") or "#" in path
            or sigv4_module().normalize_url_path(path) != path):
        return InvalidSignature("The request path is not in canonical form (it must start with "
                                "'/' and have no '.', '..' or empty segments): send the path as "
                                "an SDK does")
    return None


Parsed = tuple[str, str, str, str, list[str], str]


def _parse_authorization(value: str) -> Parsed | RuntimeServiceError:
    """The parts of a SigV4 Authorization header, or the error naming what is wrong."""
    algorithm, _, rest = value.strip().partition(" ")
    if algorithm != ALGORITHM:
        hint = " (a bearer token was sent)" if algorithm.lower() == "bearer" else ""
        return IncompleteSignature(f"Authorization header uses an unsupported scheme{hint}: "
                                   f"this endpoint accepts SigV4 ({ALGORITHM}) signatures only; "
                                   "sign with an AWS SDK")
    fields: dict[str, str] = {}
    for part in rest.split(","):
        name, eq, field = part.strip().partition("=")
        if not eq or name not in ("Credential", "SignedHeaders", "Signature") or name in fields:
            return IncompleteSignature(
                "Authorization header is malformed: expected Credential=..., "
                "SignedHeaders=..., Signature=... separated by commas; sign with an AWS SDK")
        fields[name] = field.strip()
    for required in ("Credential", "SignedHeaders", "Signature"):
        if required not in fields:
            return IncompleteSignature(f"Authorization header requires '{required}' parameter: "
                                       "sign with an AWS SDK")
    scope = fields["Credential"].split("/")
    if (len(scope) != 5 or not ACCESS_KEY_ID.fullmatch(scope[0])
            or not _SCOPE_DATE.fullmatch(scope[1]) or not _SCOPE_PART.fullmatch(scope[2])
            or not _SCOPE_PART.fullmatch(scope[3]) or scope[4] != "aws4_request"):
        return IncompleteSignature(
            "Authorization header has a malformed Credential: expected "
            "<access key id>/<YYYYMMDD>/<region>/<service>/aws4_request")
    names = fields["SignedHeaders"].split(";")
    if (len(names) > _MAX_SIGNED_HEADERS or len(set(names)) != len(names)
            or not all(_HEADER_NAME.fullmatch(n) for n in names)):
        return IncompleteSignature("Authorization header has malformed SignedHeaders: expected "
                                   "lower-case header names separated by ';'")
    if "host" not in names:
        return IncompleteSignature("The Host header must be signed: list 'host' in "
                                   "SignedHeaders (SDKs always do)")
    if not _SIGNATURE.fullmatch(fields["Signature"]):
        return IncompleteSignature("Authorization header has a malformed Signature: expected "
                                   "64 lower-case hexadecimal digits")
    return scope[0], scope[1], scope[2], scope[3], names, fields["Signature"]
