"""Drain this Ray node when EC2 announces a spot interruption (started on every worker by ray_cluster.yaml).

EC2 gives a spot instance a two-minute notice: the instance metadata item `spot/instance-action` appears
(404 until then) with the action and its time. This watcher polls it over IMDSv2 and, on a notice, asks the
GCS to drain this node with reason PREEMPTION and the notice's deadline (`ray drain-node`): Ray schedules no
new tasks or actors there, and Ray Data and Ray Train move their work to other nodes before the instance
goes. On an on-demand instance (no notice ever comes) it exits at once; one watcher runs per machine.

    python cluster/spot_drain.py --address HEAD_IP:6379 [--node-id HEX] [--interval 5] [--once]

The ray CLI it runs needs the cluster's auth settings (RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH), which the
containers of ray_cluster.yaml carry. Standard library only, besides the `ray` command.
"""

from __future__ import annotations

import argparse
import datetime as dt
import fcntl
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

# The endpoint AWS SDKs honour too; tests point it at a local fake.
IMDS = os.environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://169.254.169.254").rstrip("/")
TOKEN_TTL_S = 21600
LOCK = os.environ.get("EVL_SPOT_DRAIN_LOCK", "/tmp/evl-spot-drain.lock")
REASON = "DRAIN_NODE_REASON_PREEMPTION"


def log(message: str) -> None:
    print(f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%dT%H:%M:%SZ} spot_drain: {message}", flush=True)


class Metadata:
    """IMDSv2: a session token from PUT /latest/api/token, sent with every GET (refreshed when refused)."""

    def __init__(self, endpoint: str = IMDS, timeout: float = 2.0) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.token: str | None = None

    def _token(self) -> str:
        request = urllib.request.Request(f"{self.endpoint}/latest/api/token", method="PUT",
                                         headers={"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_S)})
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return response.read().decode()

    def get(self, path: str) -> str | None:
        """The item's text, or None when it does not exist (404)."""
        for attempt in range(2):
            if self.token is None:
                self.token = self._token()
            request = urllib.request.Request(f"{self.endpoint}/latest/meta-data/{path}",
                                             headers={"X-aws-ec2-metadata-token": self.token})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return response.read().decode()
            except urllib.error.HTTPError as e:
                if e.code == 404:
                    return None
                if e.code == 401 and attempt == 0:  # the token expired: get a new one
                    self.token = None
                    continue
                raise
        return None


def seconds_left(notice: dict, now: float) -> int:
    """Whole seconds from `now` to the notice's time (0 if past or unreadable)."""
    try:
        when = dt.datetime.strptime(notice["time"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
    except (KeyError, TypeError, ValueError):
        return 0
    return max(0, int(when.timestamp() - now))


def drain_command(address: str, node_id: str, notice: dict, now: float) -> list[str]:
    """The `ray drain-node` invocation for a notice ({"action": ..., "time": ...})."""
    return ["ray", "drain-node", f"--address={address}", f"--node-id={node_id}", f"--reason={REASON}",
            f"--reason-message=EC2 spot interruption: {notice.get('action', '?')} at {notice.get('time', '?')}",
            f"--deadline-remaining-seconds={seconds_left(notice, now)}"]


def local_node_id(address: str, ip: str) -> str:
    """The hex id of the alive Ray node at this machine's private address, asked of the GCS."""
    import ray._raylet
    from ray.core.generated import gcs_pb2

    nodes = ray._raylet.GcsClient(address=address).get_all_node_info()
    ids = [info.node_id.hex() for info in nodes.values()
           if info.node_manager_address == ip and info.state == gcs_pb2.GcsNodeInfo.ALIVE]
    if len(ids) != 1:
        raise RuntimeError(f"expected one alive Ray node at {ip}, found {len(ids)}")
    return ids[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS"), help="GCS address, HOST:PORT")
    parser.add_argument("--node-id", help="hex id of the Ray node to drain (default: the one at this machine's IP)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between polls")
    parser.add_argument("--once", action="store_true", help="check once and exit (tests)")
    args = parser.parse_args(argv)
    if not args.address:
        parser.error("--address (or RAY_ADDRESS) is required")

    lock = open(LOCK, "w")  # noqa: SIM115 - held for the life of the process
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        log("another watcher runs on this machine")
        return 0

    imds = Metadata()
    try:
        lifecycle = imds.get("instance-life-cycle")
    except OSError as e:
        log(f"no instance metadata ({e}); not on EC2?")
        return 0
    if lifecycle != "spot":
        log(f"instance life cycle is {lifecycle!r}, not spot: nothing to watch")
        return 0
    log(f"watching {IMDS}/latest/meta-data/spot/instance-action every {args.interval:g} s")

    while True:
        try:
            text = imds.get("spot/instance-action")
        except OSError as e:  # a hiccup of the metadata service: keep watching
            log(f"metadata request failed: {e}")
            text = None
        if text:
            notice = json.loads(text)
            node_id = args.node_id or local_node_id(args.address, imds.get("local-ipv4") or "")
            command = drain_command(args.address, node_id, notice, time.time())
            log(f"notice {notice}: {' '.join(command)}")
            result = subprocess.run(command, capture_output=True, text=True, timeout=60)
            if result.returncode == 0:
                log("drain accepted")
                return 0
            log(f"drain failed ({result.returncode}): {result.stderr.strip()[-500:]}")
            if seconds_left(notice, time.time()) == 0:
                return 1
        if args.once:
            return 0 if not text else 1
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())
