"""The minio client, taught what real Amazon S3 does that SeaweedFS (our test store) never does.

Imported only by ``fetch.s3_client`` (minio is slow to import). Three behaviours of AWS:

* A bucket answers only in its own region. minio either signs every request with the
  one region it was given (``AWS_REGION``, which EKS injects into every IRSA pod: a
  bucket elsewhere answers 301 PermanentRedirect / 400 AuthorizationHeaderMalformed,
  for good) or, given none, asks GetBucketLocation first (an extra permission that
  least-privilege policies rarely grant: AccessDenied on every call). Like the AWS SDKs,
  we send the request and, when S3 names the bucket's region in its refusal
  (``x-amz-bucket-region``, or ``<Region>`` in the body), remember it and resend once.
* CompleteMultipartUpload, CopyObject and UploadPartCopy may answer ``200 OK`` with an
  ``<Error>`` body (the failure happens after the status line went out). minio reads
  that as success: a "written" object that does not exist. We raise it as the error.
* Directory buckets (S3 Express One Zone, names ending ``--x-s3``) need zonal endpoints
  and session auth this client does not do: refused up front with a clear message.
"""

from __future__ import annotations

import re
from typing import Any
from xml.etree import ElementTree as ET

from minio import Minio
from minio.error import S3Error

from kubeinfer_runtime.storage.uri import DIRECTORY_BUCKET_SUFFIX

#: Statuses S3 gives a request sent to (or signed for) the wrong region.
_WRONG_REGION_STATUSES = {301, 307, 400}
_REGION_IN_BODY = re.compile(rb"<Region>([a-z0-9-]{1,40})</Region>")


class DirectoryBucketUnsupported(ValueError):
    """An S3 Express One Zone bucket: refused before any request (a ValueError, like minio's
    own refusals of names, so callers report it as a location that cannot be used)."""


def region_of_refusal(error: S3Error) -> str | None:
    """The bucket's region when ``error`` is S3 refusing a request for being in the wrong
    region (the header S3 adds, else the ``<Region>`` of an AuthorizationHeaderMalformed)."""
    response = error.response
    if response is None or response.status not in _WRONG_REGION_STATUSES:
        return None
    region = response.headers.get("x-amz-bucket-region")
    if region:
        return str(region)
    found = _REGION_IN_BODY.search(response.data or b"")
    return found.group(1).decode() if found else None


def _error_in_ok(method: str, headers: dict[str, Any] | None,
                 query_params: dict[str, Any] | None) -> bool:
    """Whether this request is one S3 may answer 200 OK with an error body."""
    completes = method == "POST" and "uploadId" in (query_params or {})
    copies = method == "PUT" and any(k.lower() == "x-amz-copy-source" for k in headers or {})
    return completes or copies


def _is_error(data: bytes) -> bool:
    try:
        return ET.fromstring(data).tag == "Error"
    except ET.ParseError:
        return False


class AwsMinio(Minio):
    """``Minio`` with the AWS behaviours in the module docstring handled."""

    def _get_region(self, bucket_name: str | None = None) -> str:
        if bucket_name:
            learnt = self._region_map.get(bucket_name)
            if learnt:
                return learnt
            if self._base_url.is_aws_host and not self._base_url.region:
                # Not GetBucketLocation: a wrong guess is answered with the right region.
                return "us-east-1"
        return str(super()._get_region(bucket_name))

    def _execute(self, method: str, bucket_name: str | None = None,
                 object_name: str | None = None, body: bytes | None = None,
                 headers: dict[str, Any] | None = None,
                 query_params: dict[str, Any] | None = None,
                 preload_content: bool = True, no_body_trace: bool = False) -> Any:
        if bucket_name and bucket_name.endswith(DIRECTORY_BUCKET_SUFFIX):
            raise DirectoryBucketUnsupported(
                f"bucket {bucket_name!r} is an S3 directory bucket (S3 Express One Zone), "
                "which kubeinfer does not support: use a general purpose bucket")

        def send() -> Any:
            # A copy each time: minio adds Host, dates and the signature to the dict.
            return super(AwsMinio, self)._execute(
                method, bucket_name, object_name, body,
                dict(headers) if headers is not None else None, query_params,
                preload_content, no_body_trace)

        try:
            response = send()
        except S3Error as e:
            region = region_of_refusal(e)
            if not bucket_name or not region or region == self._get_region(bucket_name):
                raise
            self._region_map[bucket_name] = region
            response = send()
        if preload_content and _error_in_ok(method, headers, query_params):
            data = response.data or b""
            if b"<Error>" in data[:512] and _is_error(data):
                raise S3Error.fromxml(response)
        return response
