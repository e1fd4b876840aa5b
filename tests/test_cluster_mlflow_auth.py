"""cluster/mlflow_server.sh: the MLflow server of the cluster, with authentication.

- The command it builds (dry run): MLflow's basic-auth app, the private address, flags this MLflow accepts;
  what it refuses (public or wildcard addresses, no jobs account, a short password, no artifact store, an
  MLflow older than 3.5, which has no Host-header protection).
- The database URI from SSM Parameter Store (cluster/ssm_parameter.py with the real botocore, against a local
  fake of the SSM API): used when present, SQLite when the parameter does not exist, a stop on other errors.
- The real server on 127.0.0.1: requests without credentials or with a wrong password are refused, the jobs'
  account creates an experiment, a foreign Host header is refused, and its secrets are readable by its user
  only.
"""

from __future__ import annotations

import base64
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
ART = "s3://YOUR-BUCKET/evl/mlflow-artifacts"
JOBS = {"MLFLOW_TRACKING_USERNAME": "evl-jobs", "MLFLOW_TRACKING_PASSWORD": "correct-horse-battery"}


def _mlflow(tmp_path, *args, dry_run=True, **env):
    base = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HOME": str(tmp_path)}
    if dry_run:
        base["MLFLOW_DRY_RUN"] = "1"
    return subprocess.run(["bash", str(CLUSTER / "mlflow_server.sh"), *args], capture_output=True, text=True,
                          env={**base, **env}, timeout=120)


def _flags(stdout: str) -> dict:
    cmd = shlex.split(stdout)
    assert cmd[:2] == ["mlflow", "server"], cmd
    flags = cmd[2:]
    return {flags[i]: (flags[i + 1] if i + 1 < len(flags) and not flags[i + 1].startswith("--") else True)
            for i in range(len(flags)) if flags[i].startswith("--")}


def test_server_command_has_authentication_and_a_private_address(tmp_path):
    out = _mlflow(tmp_path, MLFLOW_HOST="10.0.1.23", MLFLOW_ARTIFACTS_DESTINATION=ART, **JOBS)
    assert out.returncode == 0, out.stderr
    value = _flags(out.stdout)
    assert value["--app-name"] == "basic-auth"
    assert value["--host"] == "10.0.1.23" and value["--port"] == "5000"
    assert value["--artifacts-destination"] == ART and value["--serve-artifacts"] is True
    assert value["--backend-store-uri"] == f"sqlite:///{tmp_path}/mlflow/mlflow.db" and value["--workers"] == "1"
    assert not (tmp_path / "mlflow").exists(), "a dry run writes nothing"
    # A database from the environment (on Kubernetes: a Secret), more workers, the Host names to accept.
    out = _mlflow(tmp_path, MLFLOW_HOST="10.0.1.23", MLFLOW_ARTIFACTS_DESTINATION=ART, MLFLOW_WORKERS="8",
                  MLFLOW_BACKEND_STORE_URI="postgresql://u:p@db:5432/mlflow", MLFLOW_ALLOWED_HOSTS="mlflow.evl.svc",
                  **JOBS)
    value = _flags(out.stdout)
    assert value["--backend-store-uri"] == "postgresql://u:p@db:5432/mlflow" and value["--workers"] == "8"
    assert value["--allowed-hosts"] == "mlflow.evl.svc"
    out = _mlflow(tmp_path, MLFLOW_HOST="10.0.1.23", MLFLOW_ARTIFACTS_DESTINATION=ART,
                  MLFLOW_BACKEND_STORE_URI="postgresql://u:p@db:5432/mlflow", **JOBS)
    assert _flags(out.stdout)["--workers"] == "4"
    # The flags are ones this MLflow's server command accepts.
    from mlflow.cli import server

    accepted = {opt for param in server.params for opt in param.opts}
    assert set(_flags(out.stdout)) <= accepted
    out = _mlflow(tmp_path, "--print-host", MLFLOW_HOST="10.0.1.23")
    assert out.returncode == 0 and out.stdout.strip() == "10.0.1.23"


@pytest.mark.parametrize("env, message", [
    ({"MLFLOW_HOST": "0.0.0.0"}, "not a private address"),
    ({"MLFLOW_HOST": "::"}, "not a private address"),
    ({"MLFLOW_HOST": "8.8.8.8"}, "not a private address"),
    ({"MLFLOW_TRACKING_USERNAME": ""}, "MLFLOW_TRACKING_USERNAME"),
    ({"MLFLOW_TRACKING_PASSWORD": "short"}, "12 characters"),
    ({"MLFLOW_ARTIFACTS_DESTINATION": ""}, "MLFLOW_ARTIFACTS_DESTINATION"),
], ids=["wildcard", "wildcard6", "public", "no user", "short password", "no artifacts"])
def test_server_refuses_unsafe_settings(tmp_path, env, message):
    out = _mlflow(tmp_path, **{"MLFLOW_HOST": "10.0.1.23", "MLFLOW_ARTIFACTS_DESTINATION": ART, **JOBS, **env})
    assert out.returncode != 0 and "mlflow" not in out.stdout and message in out.stderr, out.stderr
    assert _mlflow(tmp_path, "--bogus", MLFLOW_HOST="10.0.1.23").returncode != 0


def test_server_refuses_an_mlflow_without_host_header_protection(tmp_path):
    """An MLflow older than 3.5 (a stand-in distribution ahead on the path) is refused."""
    fake = tmp_path / "site"
    (fake / "mlflow-3.4.0.dist-info").mkdir(parents=True)
    (fake / "mlflow-3.4.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: mlflow\nVersion: 3.4.0\n")
    out = _mlflow(tmp_path, MLFLOW_HOST="10.0.1.23", MLFLOW_ARTIFACTS_DESTINATION=ART, PYTHONPATH=str(fake), **JOBS)
    assert out.returncode != 0 and "3.4.0" in out.stderr and "mlflow>=3.5" in out.stderr
    # The image installs one that is new enough, with the auth app's extra.
    assert '"mlflow[auth]>=3.5,<4"' in (CLUSTER / "Dockerfile").read_text()


# ------------------------------------------------------------------------------------------------------------
# The database URI from SSM Parameter Store


class FakeSsm:
    """The SSM JSON API's GetParameter, answering from a dict; records what it was asked."""

    def __init__(self, parameters: dict[str, str], deny: bool = False) -> None:
        self.asked: list[dict] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.asked.append({"target": self.headers.get("X-Amz-Target"), "signed":
                                   self.headers.get("Authorization", "").startswith("AWS4-HMAC-SHA256"), **body})
                if deny:
                    code, reply = 400, {"__type": "AccessDeniedException", "message": "not allowed"}
                elif body["Name"] in parameters:
                    code, reply = 200, {"Parameter": {"Name": body["Name"], "Type": "SecureString",
                                                      "Value": parameters[body["Name"]], "Version": 1}}
                else:
                    code, reply = 400, {"__type": "ParameterNotFound", "message": ""}
                data = json.dumps(reply).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/x-amz-json-1.1")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.env = {"AWS_ENDPOINT_URL_SSM": f"http://127.0.0.1:{self.server.server_address[1]}",
                    "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "secret", "AWS_DEFAULT_REGION": "us-west-2",
                    "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": "/dev/null",
                    "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_database_uri_comes_from_ssm_on_the_head(tmp_path):
    uri = "postgresql://mlflow:s3cr%40t@db.internal:5432/mlflow"
    ssm = FakeSsm({"/evl/mlflow/backend-store-uri": uri})
    try:
        base = {"MLFLOW_HOST": "10.0.1.23", "MLFLOW_ARTIFACTS_DESTINATION": ART, **JOBS, **ssm.env}
        out = _mlflow(tmp_path, EVL_MLFLOW_SSM_PREFIX="/evl/mlflow", **base)
        assert out.returncode == 0, out.stderr
        assert _flags(out.stdout)["--backend-store-uri"] == uri
        assert ssm.asked == [{"target": "AmazonSSM.GetParameter", "signed": True,
                              "Name": "/evl/mlflow/backend-store-uri", "WithDecryption": True}]
        # No such parameter: SQLite on the head, said so.
        out = _mlflow(tmp_path, EVL_MLFLOW_SSM_PREFIX="/evl/other", **base)
        assert out.returncode == 0 and _flags(out.stdout)["--backend-store-uri"].startswith("sqlite:///")
        assert "no /evl/other/backend-store-uri" in out.stderr
    finally:
        ssm.close()
    denied = FakeSsm({}, deny=True)
    try:
        out = _mlflow(tmp_path, EVL_MLFLOW_SSM_PREFIX="/evl/mlflow", MLFLOW_HOST="10.0.1.23",
                      MLFLOW_ARTIFACTS_DESTINATION=ART, **JOBS, **denied.env)
        assert out.returncode == 1 and "AccessDenied" in out.stderr and "mlflow server" not in out.stdout
    finally:
        denied.close()


def test_launcher_runs_the_server_with_the_ssm_prefix_the_head_may_read():
    import yaml

    cfg = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    command = next(c for c in cfg["head_start_ray_commands"] if "mlflow_server.sh >>" in c)
    prefix = shlex.split(command.split("EVL_MLFLOW_SSM_PREFIX=", 1)[1])[0]
    script = (CLUSTER / "aws_iam.sh").read_text()
    assert f'ssm_prefix="${{EVL_SSM_PREFIX:-{prefix}}}"' in script
    assert f"AWS_DEFAULT_REGION={cfg['provider']['region']}" in command
    assert ". ~/.evl-cluster/mlflow_tracking.env" in command


# ------------------------------------------------------------------------------------------------------------
# The real server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, user: str | None = None, password: str = "", data: dict | None = None,
             host: str | None = None) -> int:
    headers = {"Content-Type": "application/json"}
    if user:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    if host:
        headers["Host"] = host
    request = urllib.request.Request(url, headers=headers, data=json.dumps(data).encode() if data else None)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, ConnectionError):
        return 0  # not listening yet


def test_real_server_requires_credentials(tmp_path):
    port = _free_port()
    env = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HOME": str(tmp_path),
           "MLFLOW_HOST": "127.0.0.1", "MLFLOW_PORT": str(port),
           "MLFLOW_ARTIFACTS_DESTINATION": (tmp_path / "artifacts").as_uri(), **JOBS}
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(["bash", str(CLUSTER / "mlflow_server.sh")], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 150  # slow on a loaded machine
        while _request(f"{base}/health") != 200:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)
        search = f"{base}/api/2.0/mlflow/experiments/search?max_results=1"
        assert _request(search) == 401
        assert _request(search, "evl-jobs", "wrong-password-123") == 401
        assert _request(search, *JOBS.values()) == 200
        assert _request(f"{base}/api/2.0/mlflow/experiments/create", *JOBS.values(), data={"name": "evl-k400"}) == 200
        # DNS rebinding: a Host header that is not this server's is refused even with credentials.
        assert _request(search, *JOBS.values(), host="evil.example.com") == 403
        # The admin account exists with a generated password, kept for this user alone.
        auth = tmp_path / "mlflow" / "auth"
        admin = (auth / "admin_password").read_text()
        assert len(admin) >= 32 and _request(search, "admin", admin) == 200
        for name in ("admin_password", "flask_secret_key", "basic_auth.ini"):
            assert (auth / name).stat().st_mode & 0o077 == 0, name
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
