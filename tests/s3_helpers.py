"""A real S3-compatible server for the tests: moto's standalone server on 127.0.0.1, behind the fault-injecting
proxy of tests/s3_faults.py (faults off unless a test turns them on).

Every process of the test session reaches it the way a cluster node reaches its store: through
`AWS_ENDPOINT_URL` and the usual credential variables, set when conftest is imported, so the shared Ray's
workers (started later) inherit them. Fake credentials; nothing leaves the machine.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tests.servers import free_port, stop, wait_until_up

BUCKET = "evl-test"
_HERE = Path(__file__).resolve().parent


def client_environment(proxy_port: int) -> dict[str, str]:
    """What a process needs to reach the test store: endpoint, fake credentials, a region, SDK retries."""
    return {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy_port}", "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
            "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
            "AWS_RETRY_MODE": "standard", "AWS_MAX_ATTEMPTS": "5"}


@dataclass
class S3Server:
    endpoint: str  # what clients use: the proxy
    proxy_port: int

    @property
    def bucket(self) -> str:
        return f"s3://{BUCKET}"

    def faults(self, slowdown: float = 0.0, reset: float = 0.0, seed: int = 0) -> dict:
        """Set the share of requests answered 503 SlowDown or reset; returns the proxy's counters."""
        with urllib.request.urlopen(f"{self.endpoint}/__faults__?slowdown={slowdown}&reset={reset}&seed={seed}",
                                    timeout=10) as r:
            return json.loads(r.read())

    def counters(self) -> dict:
        with urllib.request.urlopen(f"{self.endpoint}/__faults__", timeout=10) as r:
            return json.loads(r.read())

    def keys(self, prefix: str = "") -> list[str]:
        import boto3

        s3 = boto3.client("s3")
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


@contextlib.contextmanager
def s3_server(proxy_port: int):
    """moto on a free port, the proxy on `proxy_port` in front of it, and the test bucket."""
    import boto3

    moto_port = free_port()
    moto_bin = Path(sys.executable).with_name("moto_server")
    moto = subprocess.Popen([str(moto_bin), "-H", "127.0.0.1", "-p", str(moto_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proxy = None
    try:
        wait_until_up(moto, f"http://127.0.0.1:{moto_port}/moto-api/", "moto_server")
        proxy = subprocess.Popen([sys.executable, str(_HERE / "s3_faults.py"), "--port", str(proxy_port),
                                  "--upstream", f"http://127.0.0.1:{moto_port}"],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        if proxy.stdout.readline().strip() != "ready":
            raise RuntimeError("the S3 fault proxy did not start")
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield S3Server(f"http://127.0.0.1:{proxy_port}", proxy_port)
    finally:
        stop(proxy)
        stop(moto)


def upload_tree(local: Path, uri: str) -> None:
    """Copy every file under `local` to `uri`/<relative path>."""
    from evl import storage

    for path in sorted(local.rglob("*")):
        if path.is_file():
            storage.upload_file(str(path), storage.join(uri, *path.relative_to(local).parts))
