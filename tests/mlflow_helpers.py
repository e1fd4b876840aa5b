"""A real `mlflow server` for the tests, started as users start it (one worker, on 127.0.0.1)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

from tests.servers import free_port, stop, wait_until_up


@contextlib.contextmanager
def mlflow_server(home: Path, artifacts: str | None = None):
    """Yields the server's URL; its runs in `home`/mlflow.db, artifacts proxied to `artifacts` (a folder or a
    store URI; default `home`/artifacts)."""
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}",
         "--artifacts-destination", artifacts or str(home / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_up(server, f"http://127.0.0.1:{port}/health", "mlflow server", timeout=90)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(server)
