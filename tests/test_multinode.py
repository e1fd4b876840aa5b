"""A real three-node Ray cluster on this machine, started with the `ray start` CLI as on a real cluster, with
token authentication: a head that runs no work (0 CPUs, no custom resources), a CPU "decode" node carrying
`decode_node` and a "trainer" node carrying `trainer_node` (the resources ray_cluster.yaml gives its node
types). `evl train` is submitted to it with `ray job submit`, decoding pinned to `decode_node` and the trainers
to `trainer_node`, and Ray's state API (the dashboard's REST API, as `ray list actors` uses) shows where every
decode actor, decode task and training worker actually ran. Mid-run a second decode node joins and the first
is killed, as spot decode nodes come and go.

The decode node's CPU is free when the trainers are placed and the trainer node has one to spare for decoding,
so work that ignored the pinning could land on the other.
The cluster helpers here are also used by tests/test_cluster_spot_drain.py.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the environment's bin: `ray` (and `evl` once the project is installed)
CLASSES = 3


# ------------------------------------------------------------------------------------------------------------
# A local multi-node Ray cluster, one `ray start --block` process per node


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """Ray nodes started with the real CLI (`ray start --block`), token authentication on, own ports and
    temp dirs, so it neither sees nor disturbs any other Ray on the machine. Stopped by signalling the
    processes it started (never `ray stop`, which kills every Ray process of the user on the machine)."""

    def __init__(self) -> None:
        # Ray's Unix sockets live under the temp dir and must stay under ~107 characters: keep it short.
        self.root = Path(tempfile.mkdtemp(prefix="evlray-", dir="/tmp" if os.path.isdir("/tmp") else None))
        self.token_path = self.root / "auth_token"
        self.token_path.write_text(secrets.token_hex(32))
        self.token_path.chmod(0o600)
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.gcs_address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self.procs: list[subprocess.Popen] = []
        self.by_name: dict[str, subprocess.Popen] = {}
        self.logs: list[Path] = []
        self.nodes: dict[str, str] = {}  # role -> node id, filled in by the fixtures

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of every node and client: token auth with this cluster's token, the venv first on
        PATH (a job's entrypoint runs with the head's environment), no address of another cluster."""
        env = {k: v for k, v in os.environ.items()
               if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_path),
                   PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONUNBUFFERED="1",
                   RAY_ENABLE_UV_RUN_RUNTIME_ENV="0", RAY_USAGE_STATS_ENABLED="0")
        env.update(extra)
        return env

    def _start(self, name: str, args: list[str]) -> None:
        log = self.root / f"{name}.log"
        if log not in self.logs:
            self.logs.append(log)
        cmd = [str(BIN / "ray"), "start", "--block", "--temp-dir", str(self.root / name),
               "--object-store-memory", str(100 * 1024 * 1024), "--disable-usage-stats",
               "--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port", str(free_port()),
               *args]
        # RAY_ADDRESS: Ray processes that look the cluster up by themselves (e.g. Ray Train's
        # PlacementGroupCleaner) find this one, not whichever cluster /tmp/ray names. No drain on SIGTERM. A lost
        # node is declared dead after 3 missed health checks 1 s apart (Ray's default: 5, 3 s apart), so what
        # follows a loss (its actors restarted elsewhere) starts ~12 s sooner: the multi-node job's first step
        # after the loss came 10 s after the one before it instead of 23 s. And
        # the settings cluster/Dockerfile gives every node: idle workers kept as a local instance keeps them.
        from workflows.runtime import LOCAL_SYSTEM_CONFIG

        env = self.env(RAY_ADDRESS=self.gcs_address, RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
                       RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="3",
                       **{f"RAY_{key}": str(value) for key, value in LOCAL_SYSTEM_CONFIG.items()})
        with open(log, "w") as out:
            self.procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL, start_new_session=True))
        self.by_name[name] = self.procs[-1]

    def start_head(self, num_cpus: int, **resources: float) -> None:
        self._start("head", ["--head", "--port", str(self.gcs_port), "--dashboard-port", str(self.dashboard_port),
                             "--dashboard-host", "127.0.0.1", "--include-dashboard", "true",
                             "--ray-client-server-port", str(free_port()), "--num-cpus", str(num_cpus),
                             *(["--resources", json.dumps(resources)] if resources else [])])

    def add_node(self, name: str, num_cpus: int, **resources: float) -> None:
        self._start(name, ["--address", self.gcs_address, "--num-cpus", str(num_cpus),
                           *(["--resources", json.dumps(resources)] if resources else [])])

    def join(self, name: str, num_cpus: int, attempts: int = 3, **resources: float) -> str:
        """Add a node to the running cluster (as the autoscaler does) and wait until it is alive; its node id.

        `ray start` gives its raylet 30 s to register with the GCS; on a busy 2-core machine that can pass,
        and the start fails: it is then started again, as an autoscaler relaunches a node that failed to boot."""
        known = {n["node_id"] for n in self.state("nodes")}
        for _ in range(attempts):
            self.add_node(name, num_cpus, **resources)
            proc, deadline = self.by_name[name], time.monotonic() + 120
            while proc.poll() is None and time.monotonic() < deadline:
                new = [n["node_id"] for n in self.state("nodes") if n["state"] == "ALIVE" and n["node_id"] not in known]
                if new:
                    return new[0]
                time.sleep(2)
            self.procs.remove(proc)
            try:  # the start failed or hung: end whatever of that node runs (its process group) before retrying
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)
            known = {n["node_id"] for n in self.state("nodes")}
        raise AssertionError(f"node {name} did not join in {attempts} attempts\n{self.tail()}")

    def kill_node(self, name: str) -> None:
        """The node is lost as a reclaimed spot instance is: every process of it (raylet, object store, its
        workers) SIGKILLed at once, nothing drained or told."""
        proc = self.by_name[name]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        self.procs.remove(proc)

    def api(self, path: str, timeout: float = 10.0):
        """GET a dashboard REST endpoint with the cluster's token; the decoded JSON."""
        request = urllib.request.Request(self.dashboard_url + path,
                                         headers={"Authorization": f"Bearer {self.token_path.read_text()}"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())

    def state(self, kind: str) -> list[dict]:
        """Ray's state API (`ray list <kind> --detail`): every actor / task / node, with its node_id."""
        reply = self.api(f"/api/v0/{kind}?detail=1&limit=10000", timeout=30)
        assert reply["result"], reply.get("msg")
        return reply["data"]["result"]["result"]

    def wait_for_nodes(self, count: int, ready: str | None = None, timeout: float = 180.0) -> list[dict]:
        """Wait until `count` nodes are alive (and the dashboard endpoint `ready` answers); the nodes (state
        API rows)."""
        deadline = time.monotonic() + timeout
        error = None
        while time.monotonic() < deadline:
            dead = [p.args for p in self.procs if p.poll() is not None]
            assert not dead, f"a Ray node failed to start: {dead}\n{self.tail()}"
            try:
                nodes = [n for n in self.state("nodes") if n["state"] == "ALIVE"]
                if ready:
                    self.api(ready)
                if len(nodes) == count:
                    return nodes
                error = f"{len(nodes)} of {count} nodes alive"
            except Exception as e:  # noqa: BLE001 - the dashboard is still starting
                error = repr(e)
            time.sleep(0.5)
        raise AssertionError(f"the cluster did not come up in {timeout:.0f} s ({error})\n{self.tail()}")

    def tail(self, lines: int = 15) -> str:
        return "\n".join(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
                         for log in self.logs if log.is_file())

    def stop(self) -> None:
        """SIGTERM each `ray start --block` (it then stops its node's processes: GCS, raylet, dashboard, ...;
        the raylet's workers exit with it), workers before the head; SIGKILL the process group of any that
        is still alive after a grace period."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # its own group (start_new_session): its node's processes
                proc.wait(timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)


def run_logged(cmd: list[str], log: Path, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """Run a command, its stdout and stderr together into `log`; on a timeout, fail with the log's end."""
    with open(log, "w") as out:
        try:
            done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  timeout=timeout, check=False, **kwargs)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{' '.join(cmd[:4])} ... ran past {timeout:.0f} s\n{tail_of(log)}")
    return done


def tail_of(log: Path, lines: int = 60) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def evl_command() -> list[str]:
    """`evl`, the installed command; `python -m workflows.cli` (the same main) where the project is not
    pip-installed in this environment."""
    return ["evl"] if (BIN / "evl").is_file() else ["python", "-m", "workflows.cli"]


# ------------------------------------------------------------------------------------------------------------
# A tiny dataset of real h264 videos and its manifests (written here directly, without Ray)


def write_tiny_dataset(root: Path, width: int = 32, height: int = 32, frames: int = 16) -> dict[str, str]:
    """12 train + 6 val synthetic videos of 3 classes (32 px, 16 frames unless told); {"train": manifest, "val":
    manifest} (absolute paths, with classes.json beside them)."""
    from evl.video.decode import probe
    from evl.video.kinetics import cvdf_split, find_videos, write_manifest
    from evl.video.synth import SYNTH_CLASSES, SynthParams, write_synth_dataset

    write_synth_dataset(root, SynthParams(num_classes=CLASSES, train_per_class=4, val_per_class=2, width=width,
                                          height=height, frames=frames), workers=2)  # 320x240: 6 s on one core
    classes = sorted(SYNTH_CLASSES[:CLASSES])
    videos = find_videos(str(root))
    manifests = {}
    for split in ("train", "val"):
        entries = cvdf_split(str(root / "annotations" / f"{split}.csv"), videos, classes).entries
        assert len(entries) == CLASSES * (4 if split == "train" else 2)
        manifests[split] = str(root / "manifests" / f"{split}.parquet")
        write_manifest([{**vars(e), **vars(probe(e.path))} for e in entries], manifests[split], classes=classes)
    return manifests


EXPERIMENT = "evl-tiny-cpu"  # configs/tiny_cpu.yaml's


def tiny_overrides(manifests: dict[str, str], work: Path) -> list[str]:
    """--set flags for configs/tiny_cpu.yaml: this dataset, storage and MLflow store (absolute paths).

    The MLflow experiment is created here, with its artifacts in `work`: one that `evl train` creates in a
    SQLite store gets MLflow's default artifact root, ./mlruns in the driver's working directory (the repo,
    or a job's unpacked working_dir)."""
    from mlflow.tracking import MlflowClient

    MlflowClient(f"sqlite:///{work / 'mlflow.db'}").create_experiment(
        EXPERIMENT, artifact_location=str(work / "mlartifacts"))
    return [f"data.train_manifest={manifests['train']}", f"data.val_manifest={manifests['val']}",
            f"scaling.storage_path={work / 'runs'}", f"tracking.tracking_uri=sqlite:///{work / 'mlflow.db'}"]


def set_flags(overrides: list[str]) -> list[str]:
    return [arg for override in overrides for arg in ("--set", override)]


def finished_run(work: Path, steps: list[int]):
    """The one MLflow run in the test's store, checked finished with its metrics (loss at `steps`) and final
    artifacts."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == steps
    assert {"val_top1", "val_top5", "lr", "system/decode_failures"} <= set(run.data.metrics)
    decoding = client.get_metric_history(run.info.run_id, "system/decode_actors")  # the elastic pool, as it was
    assert decoding and all(m.value >= 1 for m in decoding), [(m.step, m.value) for m in decoding]
    assert run.data.params["model.backbone"] == "EVL-Tiny"
    assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")] == ["checkpoint/decoder.pt"]
    assert str(work / "mlartifacts") in run.info.artifact_uri, run.info.artifact_uri
    return run


def metric_history(work: Path, key: str) -> list:
    """The history of `key` on the one MLflow run in the test's store ([] until the run and metric exist)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    return client.get_metric_history(runs[0].info.run_id, key) if runs else []


def loss_steps(work: Path) -> list[int]:
    return [m.step for m in metric_history(work, "loss")]


# ------------------------------------------------------------------------------------------------------------
# The test


@pytest.fixture(scope="module")
def cluster():
    """Head (no CPUs, no custom resources), decode node (1 CPU, decode_node), trainer node (3 CPUs,
    trainer_node); the nodes by role."""
    c = LocalCluster()
    try:
        c.start_head(num_cpus=0)  # the head runs no work, as on a real cluster
        c.add_node("decode", num_cpus=1, decode_node=1)
        c.add_node("trainer", num_cpus=3, trainer_node=1)
        nodes = c.wait_for_nodes(3, ready="/api/jobs/")  # and the job API answers
        roles = {}
        for node in nodes:
            resources = node["resources_total"]
            role = "decode" if "decode_node" in resources else "trainer" if "trainer_node" in resources else "head"
            roles[role] = node["node_id"]
        assert len(roles) == 3 and next(n for n in nodes if n["node_id"] == roles["head"])["is_head_node"]
        c.nodes = roles
        yield c
    finally:
        c.stop()


def ray_job(cluster: LocalCluster, command: str, *args: str, log: Path, timeout: float = 120):
    """`ray job <command> --address <dashboard> ARGS` with the cluster's token (RAY_AUTH_MODE=token and
    RAY_AUTH_TOKEN_PATH, as the README has users set them)."""
    return run_logged([str(BIN / "ray"), "job", command, "--address", cluster.dashboard_url, "--log-color", "false",
                       *args], log, timeout=timeout, env=cluster.env(), cwd=ROOT)


def test_submitted_job_trains_on_its_nodes_while_decode_nodes_join_and_leave(cluster, tmp_path):
    """`ray job submit` as the README documents it: the working directory uploaded with the excludes of
    cluster/runtime_env.yaml, `evl train` run from the copy on the head, `ray job status` / `ray job logs` reading
    it back (the project's lines only), the run in MLflow; and Ray's state API showing every decode actor and
    task on decode nodes, every trainer on the trainer node, nothing on the head.

    Meanwhile, spot decode nodes under the elastic pool: the job is decode-bound (16 clips a step of 320x240
    videos, a tiny model); a second decode node joins mid-run and decode actors start on it (its clips reach the
    trainers: `system/decode_nodes` reaches 2); then the first decode node is lost as a spot reclaim loses it,
    every process of it SIGKILLed. The pool is capped at 3 and the new node has 3 CPUs, so the lost actors have
    room to restart there: the job goes on with the node left and finishes every step, no video is counted
    broken for it, and every wait is bounded. (The last test on this cluster: it loses a node.)

    The first decode node has one CPU, one decode actor: the steps before the join are slow and those after the
    loss fast. The join and the loss take a time, not a number of steps (about 45 of the 140 on this machine,
    with room for a slow join); the steps left then go by at three actors' pace."""
    import urllib.error
    import uuid

    with pytest.raises(urllib.error.HTTPError) as refused:  # the cluster refuses requests without the token
        urllib.request.urlopen(cluster.dashboard_url + "/api/jobs/", timeout=10)
    assert refused.value.code in (401, 403)

    steps, log_every = 140, 5
    manifests = write_tiny_dataset(tmp_path / "synth", width=320, height=240, frames=64)
    overrides = tiny_overrides(manifests, tmp_path) + [  # the elastic decode pool, pinned to decode nodes
        "data.decode_resources={decode_node: 0.001}", "scaling.resources_per_worker={trainer_node: 0.001}",
        "data.decode_workers=null", "data.max_decode_workers=3", "data.sampling_rate=8", "data.passes_per_epoch=1000",
        "train.batch_size=16", "train.micro_batch_size=8", f"train.num_steps={steps}", f"train.log_every={log_every}",
        f"train.eval_every={steps}", f"train.checkpoint_every={steps}"]
    job_id = f"evl-test-{uuid.uuid4().hex[:8]}"
    submit = ray_job(cluster, "submit", "--no-wait", "--working-dir", str(ROOT),
                     "--runtime-env", str(ROOT / "cluster" / "runtime_env.yaml"), "--submission-id", job_id,
                     "--", *evl_command(), "train", "--config", "configs/tiny_cpu.yaml", *set_flags(overrides),
                     log=tmp_path / "submit.log")
    assert submit.returncode == 0, f"ray job submit failed\n{tail_of(tmp_path / 'submit.log')}"

    def status() -> str:
        return cluster.api(f"/api/jobs/{job_id}")["status"]

    def job_logs() -> str:
        ray_job(cluster, "logs", job_id, log=tmp_path / "logs.log")
        return tail_of(tmp_path / "logs.log")

    def wait_until(what: str, ready, timeout: float, poll: float = 2.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = ready()
            if value:
                return value
            assert status() in ("PENDING", "RUNNING"), f"the job ended before {what}\n{job_logs()}"
            time.sleep(poll)
        pytest.fail(f"no {what} after {timeout:.0f} s\n{job_logs()}")

    def alive_decoders() -> list[dict]:
        return [a for a in cluster.state("actors")
                if a["class_name"] == "MapWorker(MapBatches(TrainDecoder))" and a["state"] == "ALIVE"]

    try:
        # (about 1.5 min warm; up to 5 min when nothing is in the page cache yet: ~12 processes importing torch)
        wait_until("training step", lambda: loss_steps(tmp_path), timeout=480)
        new_node = cluster.nodes["decode2"] = cluster.join("decode2", num_cpus=3, decode_node=1)
        wait_until("decode actor on the new node",
                   lambda: [a for a in alive_decoders() if a["node_id"] == new_node], timeout=180)
        wait_until("clips from both decode nodes", lambda: any(
            m.value >= 2 for m in metric_history(tmp_path, "system/decode_nodes")), timeout=180)
        lost_at = loss_steps(tmp_path)[-1]
        cluster.kill_node("decode")
        wait_until("training steps after the node loss",
                   lambda: loss_steps(tmp_path)[-1] >= lost_at + 2 * log_every, timeout=300)
        wait_until("the lost node's decode actors gone",
                   lambda: all(a["node_id"] == new_node for a in alive_decoders()), timeout=120)
        deadline = time.monotonic() + 600
        while status() in ("PENDING", "RUNNING") and time.monotonic() < deadline:
            time.sleep(2)
    finally:
        if status() in ("PENDING", "RUNNING"):
            ray_job(cluster, "stop", job_id, log=tmp_path / "stop.log")
    status_cli = ray_job(cluster, "status", job_id, log=tmp_path / "status.log")
    assert status_cli.returncode == 0 and f"Job '{job_id}' succeeded" in (tmp_path / "status.log").read_text(), \
        f"{tail_of(tmp_path / 'status.log')}\n{job_logs()}"
    assert [m.value for m in metric_history(tmp_path, "system/decode_failures")] == [0.0] * (steps // log_every)

    logs = ray_job(cluster, "logs", job_id, log=tmp_path / "logs.log")
    text = (tmp_path / "logs.log").read_text()
    assert logs.returncode == 0, tail_of(tmp_path / "logs.log")
    job_output = text.split(f"Running entrypoint for job {job_id}:", 1)[1].splitlines()[1:]
    assert job_output[0].startswith("training tiny-cpu: EVL-Tiny EVL, 4 frames"), text
    for line in (f"  step {steps}/{steps}  loss", f"  step {steps}: validation top-1", "  validation top-1 ",
                 "run tiny-cpu-"):
        assert any(out.startswith(line) for out in job_output), f"{line!r} not in the job's logs\n{text}"
    strangers = [line for line in job_output if not line.startswith(("training ", "  ", "run ")) and line]
    assert not strangers, strangers  # Ray's, DeepSpeed's and MLflow's chatter went to the job's log file
    run = finished_run(tmp_path, list(range(log_every, steps + 1, log_every)))
    assert f"MLflow run {run.info.run_id}" in text
    assert run.data.params["data.train_manifest"] == manifests["train"]

    # The job ran from the uploaded copy of the repository, which left out what the excludes name.
    package = cluster.api(f"/api/jobs/{job_id}")["runtime_env"]["working_dir"]
    assert package.startswith("gcs://_ray_pkg_"), package
    unpacked = (cluster.root / "head" / "session_latest" / "runtime_resources" / "working_dir_files" /
                package.removeprefix("gcs://").removesuffix(".zip"))
    assert unpacked.is_dir(), package
    shipped = {p.name for p in unpacked.iterdir()}
    assert {"workflows", "evl", "configs", "cluster", "pyproject.toml"} <= shipped, sorted(shipped)
    unwanted = shipped & {".venv", ".git", "data", "runs", "mlruns", "mlflow.db"}
    assert not unwanted, f"uploaded with the job: {sorted(unwanted)}"
    # logs/ (excluded from the upload) holds only what this job's driver wrote there: the library chatter.
    [library_log] = (unpacked / "logs").iterdir()
    assert library_log.name.startswith("train-") and f"library logs: logs/{library_log.name}" in text

    names = {node_id: role for role, node_id in cluster.nodes.items()}

    def where(rows: list[dict]) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for row in rows:
            out.setdefault(row.get("class_name") or row["name"], set()).add(names.get(row.get("node_id"), "?"))
        return out

    # Actors: every Ray Data map actor (the train decoders) on the decode node, every Ray Train worker on the
    # trainer node, and at least one of each kind.
    actors = cluster.state("actors")
    decoders = [a for a in actors if a["class_name"].startswith("MapWorker(")]
    trainers = [a for a in actors if a["class_name"] == "RayTrainWorker"]
    assert "MapWorker(MapBatches(TrainDecoder))" in {a["class_name"] for a in decoders}, where(actors)
    assert len(trainers) >= 2, where(actors)
    # (An actor the elastic pool asked for but never got a CPU for has no node: it ran nowhere. So has a batch
    # sent to an actor that was let go or lost before it ran; below.)
    decode_nodes = {cluster.nodes["decode"], cluster.nodes["decode2"]}
    assert all(a["node_id"] in decode_nodes for a in decoders if a["node_id"]), where(decoders)
    assert all(a["node_id"] == cluster.nodes["trainer"] for a in trainers), where(trainers)

    # Tasks: every decode call (the train map actors' `submit` tasks, the eval decode tasks) ran on the decode
    # node, the training loop (`run_train_fn`, once per worker) on the trainer node. Task events arrive
    # asynchronously: wait for them.
    def is_decode(task: dict) -> bool:
        return (task["name"].startswith("MapWorker(") and task["name"].endswith(".submit")) or \
            "decode_eval_views" in task["name"]

    deadline = time.monotonic() + 60
    while True:
        tasks = cluster.state("tasks")
        decode_calls = [t for t in tasks if is_decode(t)]
        train_fns = [t for t in tasks if t["name"] == "RayTrainWorker.run_train_fn"]
        train_decodes = [t for t in decode_calls if "TrainDecoder" in t["name"]]
        eval_decodes = [t for t in decode_calls if "decode_eval_views" in t["name"]]
        if (train_decodes and eval_decodes and len(train_fns) >= 2) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert train_decodes and eval_decodes, where(tasks)
    assert len(train_fns) >= 2, where(tasks)
    assert all(t["node_id"] in decode_nodes for t in decode_calls if t["node_id"]), where(decode_calls)
    assert all(t["node_id"] == cluster.nodes["trainer"] for t in train_fns), where(train_fns)
    # Nothing of the above on the head, which advertises no CPUs.
    assert cluster.nodes["head"] not in {r["node_id"] for r in decoders + trainers + decode_calls + train_fns}

