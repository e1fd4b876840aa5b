"""Shared fixtures. Models here use the project's tiny open_clip config (`EVL-Tiny`: 32 px, patch 8, width 64,
3 blocks) with random weights, so every test runs on a CPU in seconds."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
torch.set_num_threads(min(2, os.cpu_count() or 1))

# The test S3 server's address and fake credentials, set before any Ray starts so its workers inherit them
# (tests/s3_helpers.py); the server itself starts with the first test that asks for the `s3` fixture.
from tests.s3_helpers import client_environment  # noqa: E402
from tests.servers import free_port  # noqa: E402

S3_PROXY_PORT = free_port()
os.environ.update(client_environment(S3_PROXY_PORT))


# Modules that start Ray clusters of their own in other processes (`ray start`, `evl demo`): they run first, while
# the machine holds no other Ray (the shared one starts with the first test that needs it), so their timing-bound
# waits (nodes joining and dying mid-run) do not compete with an idle instance's processes on 2 cores.
OWN_RAY_FIRST = ("test_multinode.py", "test_cluster_spot_drain.py", "test_demo.py")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.path.name not in OWN_RAY_FIRST)  # stable: file order otherwise kept


@pytest.fixture
def tiny_model_config():
    from evl.config import ModelConfig

    return ModelConfig(backbone="EVL-Tiny", pretrained=None, num_frames=4, num_classes=5, decoder_num_layers=2)


@pytest.fixture(scope="session")
def shared_ray():
    """One local Ray for every module that needs a plain one (data, training, sweeps, evaluation): room for 2
    train workers, decode actors and a Tune trial on this small machine. Starting Ray costs seconds on 2
    cores, so the session starts it once; tests that need a cluster of their own start it in other
    processes (tests/test_multinode.py)."""
    from tests.data_helpers import ray_session

    os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "1"  # workers inherit it: samples in short runs
    # One local node, which nothing drains: Ray Train's preemption watcher (one more actor process per fit, seconds
    # on 2 cores) has nothing to watch. The clusters of tests/test_multinode.py keep Ray's defaults.
    os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
    # Ray Train's controller collects each worker's report (a one-slot queue) when it polls the workers, every 2 s by
    # default: runs here report faster than that, so a report waited up to 2 s for the one before it to be
    # collected, and a run's end was noticed up to 2 s late. A poll is one cheap call per worker.
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.5"
    with ray_session(num_cpus=4) as ray:
        yield ray


@pytest.fixture(scope="session")
def s3():
    """The session's S3-compatible server (moto behind the fault proxy) with an empty bucket `s3://evl-test`."""
    from tests.s3_helpers import s3_server

    with s3_server(S3_PROXY_PORT) as server:
        yield server


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, shared_ray):
    """A 3-class synthetic set of real h264 videos (32 px, 16 frames; 4 train + 2 val per class) with the
    manifests `evl prepare` writes."""
    from evl.video.synth import SynthParams, write_synth_dataset
    from workflows.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("tiny-synth")
    write_synth_dataset(root, SynthParams(num_classes=3, train_per_class=4, val_per_class=2, width=32, height=32,
                                          frames=16))
    prepare_dataset(str(root), str(root / "manifests"))
    return root


@pytest.fixture(scope="session")
def local_ray(shared_ray):
    """The shared local Ray, for the training and sweep tests."""
    return shared_ray


@pytest.fixture(scope="session")
def data_ray(shared_ray):
    """The shared local Ray, for the data tests (decode actors only)."""
    return shared_ray


@pytest.fixture(autouse=True)
def nothing_left_holding_cpus(request):
    """After each test on the shared Ray: every placement group and CPU-holding actor it made is gone (within
    30 s, the time Ray Train's cleaner needs). A leak holds CPUs, and a later test's trainers or decode actors
    would wait for them forever: this fails the test that leaked instead (and removes leaked placement
    groups)."""
    yield
    if "shared_ray" not in request.fixturenames:
        return
    import gc
    import time

    import ray
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group
    from ray.util.state import list_actors

    if not ray.is_initialized():
        return
    gc.collect()  # a dataset iterator the test dropped shuts its executor (and decode actors) down when collected
    deadline = time.monotonic() + 30
    while True:
        groups = {pg_id: pg for pg_id, pg in placement_group_table().items() if pg["state"] != "REMOVED"}
        free = ray.available_resources().get("CPU", 0) >= ray.cluster_resources().get("CPU", 0)
        if (not groups and free) or time.monotonic() > deadline:
            break
        time.sleep(1)
    actors = [] if free else [a for a in list_actors(filters=[("state", "=", "ALIVE")], detail=True, limit=1000)
                              if a.required_resources.get("CPU", 0) > 0]
    for pg_id in groups:
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
    assert not groups and not actors, ("left behind: placement groups "
                                       f"{[(pg['bundles'], pg['state']) for pg in groups.values()]}, actors "
                                       f"{[a.class_name for a in actors]}")
