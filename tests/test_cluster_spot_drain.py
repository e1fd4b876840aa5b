"""cluster/spot_drain.py, the spot interruption watcher ray_cluster.yaml starts on every worker.

A fake instance metadata service (IMDSv2: token PUT, token-guarded GETs, a 404 until the notice) stands in
for EC2's; the drain call is checked against Ray's own `ray drain-node` parser, and once for real: against a
local two-node cluster (`ray start`, token auth, a head with no CPUs), after which the GCS lists the node as
draining with the notice's deadline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "cluster" / "spot_drain.py"

def _load_script():
    """The script as a module, without leaving a __pycache__ in cluster/ (which ships as it is)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("spot_drain", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    before, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = before
    return module


spot_drain = _load_script()


class FakeImds:
    """EC2's instance metadata service, as much of it as the watcher uses (IMDSv2 only)."""

    def __init__(self, lifecycle: str = "spot", ip: str = "127.0.0.1") -> None:
        self.items = {"instance-life-cycle": lifecycle, "local-ipv4": ip}
        self.tokens: set[str] = set()
        self.requests: list[tuple[str, str, bool]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _reply(self, code: int, body: str = "") -> None:
                self.send_response(code)
                self.end_headers()
                self.wfile.write(body.encode())

            def do_PUT(self):  # noqa: N802
                fake.requests.append(("PUT", self.path, True))
                ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
                if self.path != "/latest/api/token" or not ttl or not 1 <= int(ttl) <= 21600:
                    return self._reply(400)
                token = f"token-{len(fake.tokens)}"
                fake.tokens.add(token)
                self._reply(200, token)

            def do_GET(self):  # noqa: N802
                authorised = self.headers.get("X-aws-ec2-metadata-token") in fake.tokens
                fake.requests.append(("GET", self.path, authorised))
                if not authorised:  # IMDSv2 only, as ray_cluster.yaml's MetadataOptions require
                    return self._reply(401)
                item = fake.items.get(self.path.removeprefix("/latest/meta-data/"))
                self._reply(200, item) if item is not None else self._reply(404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def notice(self, seconds: int, action: str = "terminate") -> dict:
        when = (datetime.now(timezone.utc) + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.items["spot/instance-action"] = json.dumps({"action": action, "time": when})
        return {"action": action, "time": when}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def imds():
    fake = FakeImds()
    yield fake
    fake.close()


def _watch(imds: FakeImds, tmp_path: Path, *args: str, env: dict | None = None, timeout: float = 60):
    env = {**(env or os.environ), "AWS_EC2_METADATA_SERVICE_ENDPOINT": imds.url,
           "EVL_SPOT_DRAIN_LOCK": str(tmp_path / "lock")}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_metadata_client_speaks_imdsv2(imds):
    client = spot_drain.Metadata(imds.url)
    assert client.get("instance-life-cycle") == "spot"
    assert client.get("spot/instance-action") is None  # 404: no notice yet
    imds.tokens.clear()  # the token expired: refused once, then a new token
    assert client.get("local-ipv4") == "127.0.0.1"
    assert imds.requests[0][:2] == ("PUT", "/latest/api/token")
    assert [r for r in imds.requests if r[0] == "GET" and not r[2]] == [("GET", "/latest/meta-data/local-ipv4", False)]


def test_drain_command_is_what_ray_drain_node_accepts():
    import click
    from ray.scripts.scripts import cli

    now = time.time()
    notice = {"action": "terminate", "time": datetime.fromtimestamp(now + 95, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    command = spot_drain.drain_command("10.0.1.23:6379", "ab" * 28, notice, now)
    assert command[:2] == ["ray", "drain-node"]
    ctx = cli.make_context("ray", command[1:2])
    sub = cli.get_command(ctx, "drain-node")
    params = sub.make_context("drain-node", command[2:]).params
    assert params["reason"] == "DRAIN_NODE_REASON_PREEMPTION"
    assert params["node_id"] == "ab" * 28 and params["address"] == "10.0.1.23:6379"
    assert 93 <= params["deadline_remaining_seconds"] <= 95
    assert "spot interruption" in params["reason_message"]
    # A notice in the past or unreadable: drain now (deadline 0), never a negative deadline Ray refuses.
    assert spot_drain.seconds_left({"time": "2001-01-01T00:00:00Z"}, now) == 0
    assert spot_drain.seconds_left({"time": "soon"}, now) == 0
    with pytest.raises(click.UsageError):
        sub.make_context("drain-node", [*command[2:4], "--reason=DRAIN_NODE_REASON_SPOT"])


def test_node_is_found_by_its_private_address(monkeypatch):
    import ray._raylet
    from ray.core.generated import gcs_pb2

    nodes = {}
    for i, (ip, state) in enumerate([("10.0.1.5", "ALIVE"), ("10.0.1.6", "ALIVE"), ("10.0.1.6", "DEAD")]):
        info = gcs_pb2.GcsNodeInfo(node_id=bytes([i]) * 28, node_manager_address=ip,
                                   state=getattr(gcs_pb2.GcsNodeInfo, state))
        nodes[i] = info

    class FakeGcs:
        def __init__(self, address):
            assert address == "10.0.1.5:6379"

        def get_all_node_info(self):
            return nodes

    monkeypatch.setattr(ray._raylet, "GcsClient", FakeGcs)
    assert spot_drain.local_node_id("10.0.1.5:6379", "10.0.1.6") == (bytes([1]) * 28).hex()
    with pytest.raises(RuntimeError):
        spot_drain.local_node_id("10.0.1.5:6379", "10.0.1.9")


def test_on_demand_nodes_and_quiet_spot_nodes_are_left_alone(tmp_path):
    on_demand = FakeImds(lifecycle="on-demand")
    try:
        out = _watch(on_demand, tmp_path, "--address", "127.0.0.1:1")
        assert out.returncode == 0 and "not spot" in out.stdout
        assert not [r for r in on_demand.requests if "instance-action" in r[1]]
    finally:
        on_demand.close()
    quiet = FakeImds()
    try:
        out = _watch(quiet, tmp_path, "--address", "127.0.0.1:1", "--once")
        assert out.returncode == 0, out.stdout + out.stderr
        assert ("GET", "/latest/meta-data/spot/instance-action", True) in quiet.requests
        # A second watcher on the same machine steps aside.
        with open(tmp_path / "lock", "w") as held:
            import fcntl

            fcntl.flock(held, fcntl.LOCK_EX)
            out = _watch(quiet, tmp_path, "--address", "127.0.0.1:1", "--once")
        assert out.returncode == 0 and "another watcher" in out.stdout
    finally:
        quiet.close()


def test_launcher_starts_the_watcher_on_workers():
    cfg = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    worker = "\n".join(cfg["worker_start_ray_commands"])
    assert "cluster/spot_drain.py --address=$RAY_HEAD_IP:6379" in worker
    assert "spot_drain" not in "\n".join(cfg["head_start_ray_commands"])


GCS_QUERY = """
import json, sys, time
import ray._raylet
from ray.core.generated import gcs_pb2
gcs = ray._raylet.GcsClient(address=sys.argv[1])
if sys.argv[2] == "nodes":
    deadline = time.time() + 180  # a loaded machine starts a node slowly
    while time.time() < deadline:
        alive = {i.node_id.hex(): dict(i.resources_total) for i in gcs.get_all_node_info().values()
                 if i.state == gcs_pb2.GcsNodeInfo.ALIVE}
        if len(alive) == int(sys.argv[3]):
            break
        time.sleep(0.3)
    print(json.dumps(alive))
else:  # one node: still draining (with its deadline), or gone, and why
    node = sys.argv[3]
    deadline = time.time() + 30
    while True:
        draining = {k if isinstance(k, str) else k.hex(): v for k, v in gcs.get_draining_nodes().items()}
        info = next(i for i in gcs.get_all_node_info().values() if i.node_id.hex() == node)
        if node in draining or info.state == gcs_pb2.GcsNodeInfo.DEAD or time.time() > deadline:
            break
        time.sleep(0.3)
    print(json.dumps({"draining_deadline_ms": draining.get(node), "state": gcs_pb2.GcsNodeInfo.GcsNodeState.Name(info.state),
                      "death_reason": info.death_info.DESCRIPTOR.enum_types_by_name["Reason"].values_by_number[info.death_info.reason].name,
                      "death_message": info.death_info.reason_message}))
"""


def test_notice_drains_the_node_in_a_real_cluster(imds, tmp_path):
    from tests.test_multinode import LocalCluster

    cluster = LocalCluster()
    try:
        cluster.start_head(num_cpus=0)
        cluster.add_node("decode", num_cpus=1, decode_node=1)
        def query(*args: str):
            out = subprocess.run([sys.executable, "-c", GCS_QUERY, cluster.gcs_address, *args], capture_output=True,
                                 text=True, env=cluster.env(), timeout=120)
            assert out.returncode == 0, out.stderr[-2000:]
            return json.loads(out.stdout)

        nodes = query("nodes", "2")
        assert len(nodes) == 2, f"{nodes}\n{cluster.tail(40)}"
        decode = next(node for node, resources in nodes.items() if "decode_node" in resources)
        head = next(node for node in nodes if node != decode)
        assert nodes[head].get("CPU", 0) == 0  # the head runs no work

        notice = imds.notice(seconds=90)
        out = _watch(imds, tmp_path, f"--address={cluster.gcs_address}", f"--node-id={decode}", "--once",
                     env=cluster.env())
        assert out.returncode == 0, out.stdout + out.stderr
        assert "drain accepted" in out.stdout and notice["time"] in out.stdout
        # Ray now schedules nothing there: the node is draining until the deadline or, being idle, has
        # already left the cluster as preempted, with the notice as the reason.
        state = query("node", decode)
        if state["state"] == "ALIVE":  # draining; its deadline is the notice's time (to the second)
            when = datetime.strptime(notice["time"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()
            assert state["draining_deadline_ms"] is not None, state
            assert abs(state["draining_deadline_ms"] / 1000 - when) <= 2, (state, notice)
        else:
            assert state["death_reason"] == "AUTOSCALER_DRAIN_PREEMPTED", state
            assert "EC2 spot interruption: terminate at " + notice["time"] in state["death_message"], state
            assert query("nodes", "1") == {head: nodes[head]}
    finally:
        cluster.stop()
