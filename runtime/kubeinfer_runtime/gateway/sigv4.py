"""botocore's SigV4 signer, fed with what the client chose: imported only when needed.

``gateway.auth`` verifies a request by signing it again exactly as the client
did. botocore holds that behaviour (its canonical request, double
percent-encoding of the path, query handling, HMAC chain), so the gateway uses
it rather than a copy; this module is where botocore is imported, on the first
SigV4 endpoint a gateway serves, so gateways of other endpoints do not pay the
import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from botocore.auth import SigV4Auth  # type: ignore[import-untyped]
from botocore.awsrequest import AWSRequest  # type: ignore[import-untyped]
from botocore.credentials import Credentials  # type: ignore[import-untyped]
from botocore.utils import normalize_url_path  # type: ignore[import-untyped]

if TYPE_CHECKING:
    from kubeinfer_runtime.gateway.auth import SignedHeaders

__all__ = ["AWSRequest", "ClientSigner", "derive_signing_key", "normalize_url_path"]


class ClientSigner(SigV4Auth):  # type: ignore[misc]
    """botocore's SigV4 with the client's choices: its signed headers, its key scope.

    ``canonical_request`` and ``string_to_sign`` are botocore's; only the
    inputs are replaced: the headers to sign (botocore would pick its own), the
    payload hash (already computed once) and the signing key (cached).
    """

    def __init__(self, signed: SignedHeaders, region: str, service: str, payload_hash: str,
                 signing_key: bytes) -> None:
        super().__init__(None, service, region)
        self._signed = signed
        self._payload_hash = payload_hash
        self._signing_key = signing_key

    def headers_to_sign(self, request: AWSRequest) -> SignedHeaders:
        return self._signed

    def payload(self, request: AWSRequest) -> str:
        return self._payload_hash

    def signature(self, string_to_sign: str, request: AWSRequest) -> str:
        sig: str = self._sign(self._signing_key, string_to_sign, hex=True)
        return sig


def derive_signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    """The SigV4 key chain, with botocore's HMAC step."""
    step = SigV4Auth(Credentials("", secret), service, region)._sign
    key: bytes = step(f"AWS4{secret}".encode(), date)
    for part in (region, service, "aws4_request"):
        key = step(key, part)
    return key
