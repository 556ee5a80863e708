"""How callers of an Endpoint's gateway authenticate: the part operator and runtime share.

The operator resolves an Endpoint's ``spec.auth`` (or the cluster default) into
an ``AuthRoute`` in the route table: the mode and the directory the gateway
reads its credentials from (a Secret mounted on Kubernetes, a folder under
``~/.kubeinfer/secrets`` in local mode). The credentials themselves never enter
the route table, a ConfigMap or an env var; the directory layout is the one a
mounted Secret has (one file per key), read by ``gateway.credentials``.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

#: SigV4 signing name of SageMaker Runtime (botocore's ``sagemaker-runtime``
#: service model signs as ``sagemaker``).
SIGNING_SERVICE = "sagemaker"
#: Where gateway pods mount the caller credentials.
CREDENTIALS_MOUNT = "/etc/kubeinfer/auth"
#: AWS's window for a request's X-Amz-Date, either side of now.
MAX_CLOCK_SKEW_S = 300.0


class AuthMode(StrEnum):
    #: Anyone who reaches the gateway may invoke (put it behind your own auth).
    NONE = "None"
    #: AWS Signature Version 4, as boto3 and the SageMaker SDK sign requests.
    SIGV4 = "SigV4"
    #: ``Authorization: Bearer <token>``.
    TOKEN = "Token"


class AuthRoute(BaseModel):
    """What the gateway needs to authenticate one endpoint's callers."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)  # see contract._Strict

    mode: AuthMode = AuthMode.NONE
    #: Directory holding the credentials (``gateway.credentials`` reads it).
    credentials_dir: str | None = None
    #: SigV4 only: the regions a signature may name (empty: any).
    regions: list[str] = Field(default_factory=list)
