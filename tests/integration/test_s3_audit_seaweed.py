"""The AWS-compatible client (``storage.s3compat``) against a real store (SeaweedFS).

The unit tests (``test_s3_audit_aws_behaviour``) play AWS's answers; this checks the
same client still does multipart writes, server-side joins and reads on a real server,
with and without a region set (no region: minio's GetBucketLocation, kept off AWS).
"""

from __future__ import annotations

import io

import pytest

from kubeinfer_runtime.batch.store import Store
from kubeinfer_runtime.contract import S3Settings
from tests.support.s3 import ACCESS_KEY, SECRET_KEY, S3Server

BUCKET = "s3-audit"


@pytest.mark.parametrize("region", ["us-east-1", None])
def test_writes_joins_and_reads_on_a_real_store(
        s3_server: S3Server, region: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    # A session token for some other AWS keys in the env must not ride along with ours.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ASIAOTHER")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "not-for-seaweed")
    client = s3_server.minio()  # type: ignore[no-untyped-call]
    if not client.bucket_exists(BUCKET):
        client.make_bucket(BUCKET)
    store = Store(S3Settings(endpoint_url=s3_server.endpoint_url, access_key=ACCESS_KEY,
                             secret_key=SECRET_KEY, region=region))
    prefix = f"s3://{BUCKET}/{region or 'none'}/"
    big = b"a" * (6 << 20)  # over one part: a multipart upload
    store.write(prefix + "p/0", io.BytesIO(big), len(big))
    store.write_bytes(prefix + "p/1", b"tail")
    store.concat(prefix + "out/x.out", [prefix + "p/0", prefix + "p/1"])
    assert store.size(prefix + "out/x.out") == len(big) + 4
    assert store.read(prefix + "p/1", 100) == b"tail"
    assert store.size(prefix + "missing") is None
    listed = dict(store.list_folder(prefix))
    assert listed == {"p/0": len(big), "p/1": 4, "out/x.out": len(big) + 4}
