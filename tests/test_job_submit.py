"""`ray job submit` as cluster/README.md documents it, against a real head started with `ray start --head` and
token authentication: the working directory is uploaded with the excludes of cluster/runtime_env.yaml, the job
runs `evl train` with the head's environment, `ray job status` / `ray job logs` read it back, and the run is in
MLflow."""

from __future__ import annotations

import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.test_multinode import (
    BIN,
    ROOT,
    LocalCluster,
    evl_command,
    finished_run,
    run_logged,
    set_flags,
    tail_of,
    tiny_overrides,
    write_tiny_dataset,
)


@pytest.fixture(scope="module")
def head():
    """A one-node cluster: the head, 4 CPUs, its dashboard (the job API) on a free port."""
    c = LocalCluster()
    try:
        c.start_head(num_cpus=4)
        c.wait_for_nodes(1, ready="/api/jobs/")  # the job API answers
        yield c
    finally:
        c.stop()


def ray_job(head: LocalCluster, command: str, *args: str, log: Path, timeout: float = 120):
    """`ray job <command> --address <dashboard> ARGS` with the cluster's token (RAY_AUTH_MODE=token and
    RAY_AUTH_TOKEN_PATH, as cluster/README.md has users set them)."""
    return run_logged([str(BIN / "ray"), "job", command, "--address", head.dashboard_url, "--log-color", "false",
                       *args], log, timeout=timeout, env=head.env(), cwd=ROOT)


def test_submitted_train_job_succeeds_and_is_tracked(head, tmp_path):
    # The cluster refuses requests without the token.
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(head.dashboard_url + "/api/jobs/", timeout=10)
    assert refused.value.code in (401, 403)

    manifests = write_tiny_dataset(tmp_path / "synth")
    job_id = f"evl-test-{uuid.uuid4().hex[:8]}"
    submit = ray_job(head, "submit", "--working-dir", str(ROOT),
                     "--runtime-env", str(ROOT / "cluster" / "runtime_env.yaml"), "--submission-id", job_id,
                     "--", *evl_command(), "train", "--config", "configs/tiny_cpu.yaml",
                     *set_flags(tiny_overrides(manifests, tmp_path)),
                     log=tmp_path / "submit.log", timeout=900)  # blocks, following the logs, until the job ends
    assert submit.returncode == 0, f"ray job submit failed\n{tail_of(tmp_path / 'submit.log')}"

    status = ray_job(head, "status", job_id, log=tmp_path / "status.log")
    assert status.returncode == 0 and f"Job '{job_id}' succeeded" in (tmp_path / "status.log").read_text(), \
        tail_of(tmp_path / "status.log")

    logs = ray_job(head, "logs", job_id, log=tmp_path / "logs.log")
    text = (tmp_path / "logs.log").read_text()
    assert logs.returncode == 0, tail_of(tmp_path / "logs.log")
    for line in ("step 1/3 loss", "step 3/3 loss", "step 3 val_top1", "validation top-1:", "run tiny-cpu-"):
        assert line in text, f"{line!r} not in the job's logs\n{tail_of(tmp_path / 'logs.log')}"

    run = finished_run(tmp_path)
    assert f"MLflow run {run.info.run_id}" in text
    assert run.data.params["data.train_manifest"] == manifests["train"]

    # The job ran from the uploaded copy of the repository, which left out what the excludes name.
    info = head.api(f"/api/jobs/{job_id}")
    package = info["runtime_env"]["working_dir"]
    assert package.startswith("gcs://_ray_pkg_"), package
    unpacked = (head.root / "head" / "session_latest" / "runtime_resources" / "working_dir_files" /
                package.removeprefix("gcs://").removesuffix(".zip"))
    assert unpacked.is_dir(), package
    shipped = {p.name for p in unpacked.iterdir()}
    assert {"workflows", "evl", "configs", "cluster", "pyproject.toml"} <= shipped, sorted(shipped)
    unwanted = shipped & {".venv", ".git", "data", "runs", "mlruns", "mlflow.db"}
    assert not unwanted, f"uploaded with the job: {sorted(unwanted)}"
