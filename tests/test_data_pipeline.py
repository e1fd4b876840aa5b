"""The Ray Data pipeline feeding a real two-worker Ray Train V2 TorchTrainer, and the eval views."""

import pickle
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
from ray.util.state import list_actors

from evl.config import Config
from evl.video.decode import probe
from evl.video.kinetics import cvdf_split, find_videos, write_manifest
from evl.video.synth import SYNTH_CLASSES
from tests.data_helpers import report_shards_loop, small_synth, write_bad_videos

NUM_FRAMES, IMAGE = 4, 32
CLASSES = sorted(SYNTH_CLASSES[:4])


@pytest.fixture(scope="module")
def manifests(tmp_path_factory):
    """train: 20 good videos + 1 truncated one, "broken" (to be dropped and counted); val: 8 videos."""
    root = tmp_path_factory.mktemp("pipeline")
    small_synth(root, classes=4, train=5, val=2, frames=24, size=40)
    videos = find_videos(str(root))
    out = {}
    for split in ("train", "val"):
        entries = cvdf_split(str(root / "annotations" / f"{split}.csv"), videos, CLASSES).entries
        rows = [{**e.__dict__, **probe(e.path).__dict__} for e in entries]
        out[split] = str(root / f"{split}.parquet")
        if split == "train":
            out["broken"] = write_bad_videos(root / "bad")["truncated"]
            rows.append({**rows[0], "path": out["broken"]})
        write_manifest(rows, out[split], classes=CLASSES)
    return out


def config(manifests, **data) -> Config:
    cfg = Config()
    cfg.model.num_frames = NUM_FRAMES
    cfg.data.train_manifest = manifests["train"]
    cfg.data.val_manifest = manifests["val"]
    cfg.data.sampling_rate = 4
    cfg.scaling.num_workers = 2
    cfg.scaling.cpus_per_worker = 0.25
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg.validate()


def test_two_train_workers_get_equal_batches_of_valid_clips(data_ray, manifests, tmp_path):
    import ray.train
    from ray.train.torch import TorchTrainer

    from workflows.data import train_dataset
    from workflows.decode_stats import decode_failures, decode_stats

    cfg = config(manifests, passes_per_epoch=2)  # one actor pool for two reshuffled passes
    with decode_stats() as stats:
        trainer = TorchTrainer(
            report_shards_loop,  # lives in an importable module: Ray workers cannot import test files
            # each epoch restarts the decode actors: ~20 s on a busy 2-core box
            train_loop_config={"epochs": 1, "decode_stats": stats},
            scaling_config=ray.train.ScalingConfig(num_workers=2, use_gpu=False,
                                                   resources_per_worker={"CPU": 0.25}),
            run_config=ray.train.RunConfig(storage_path=str(tmp_path), name="pipeline"),
            datasets={"train": train_dataset(cfg, IMAGE, stats)},
        )
        metrics = trainer.fit().metrics
        assert decode_failures(stats)["total"] == 2  # the driver sees the workers' counts
    workers = metrics["workers"]  # [worker][epoch] -> what it saw
    assert len(workers) == 2
    counts = [w[0]["batches"] for w in workers]
    assert counts[0] == counts[1] == 10  # 2 passes x 20 decodable clips, equal split, batches of 2
    for w in workers:
        assert w[0]["shapes"] == [(2, NUM_FRAMES, 3, IMAGE, IMAGE)]
        assert w[0]["dtypes"] == [("torch.uint8", "torch.int64")]
        assert all(0 <= label < len(CLASSES) for label in w[0]["labels"])
    assert Counter(workers[0][0]["labels"] + workers[1][0]["labels"]) == {i: 10 for i in range(4)}
    failures = metrics["failures"]
    assert failures["total"] == 2 and failures["by_dataset"] == {"train": 2}  # the broken video, each pass
    assert list(failures["files"]) == [manifests["broken"]]
    deadline = time.monotonic() + 30
    while stats in {a.name for a in list_actors(filters=[("state", "=", "ALIVE")])} and time.monotonic() < deadline:
        time.sleep(0.5)
    assert stats not in {a.name for a in list_actors(filters=[("state", "=", "ALIVE")])}  # it ends with its run


def test_every_execution_draws_a_new_shuffle(manifests):
    """Ray Data plans (get_read_tasks) per execution = per epoch, so each epoch gets its own order."""
    from evl.video.kinetics import read_manifest
    from workflows.data import TableSource

    table = read_manifest(manifests["train"])
    source = TableSource(table, rows_per_block=4, shuffle=True)

    def order():
        return [p for task in source.get_read_tasks(1) for block in task() for p in block.column("path").to_pylist()]

    first, second = order(), order()
    assert sorted(first) == sorted(second) == sorted(table.column("path").to_pylist())
    assert first != second
    assert [sum(len(b) for b in t()) for t in source.get_read_tasks(1)] == [4, 4, 4, 4, 4, 1]
    big = pa.table({"path": [f"/videos/{i:08d}.mp4" for i in range(50_000)], "label": np.arange(50_000)})
    task = TableSource(big, rows_per_block=64, shuffle=True).get_read_tasks(1)[0]
    assert len(pickle.dumps(task)) < 20_000  # each task carries its rows, not the whole manifest
    passes = [p for t in TableSource(table, 4, shuffle=True, passes=3).get_read_tasks(1) for b in t()
              for p in b.column("path").to_pylist()]
    thirds = [passes[i * table.num_rows:(i + 1) * table.num_rows] for i in range(3)]
    assert all(sorted(third) == sorted(first) for third in thirds) and thirds[0] != thirds[1]
    seeded = [TableSource(table, 4, shuffle=True, seed=7) for _ in range(2)]  # two runs of one config

    def rows(source):
        return [(p, s) for t in source.get_read_tasks(1) for b in t()
                for p, s in zip(b.column("path").to_pylist(), b.column("seed").to_pylist())]

    epochs = [[rows(source) for _ in range(2)] for source in seeded]
    assert epochs[0] == epochs[1]  # same seed: same order and per-row seeds, epoch by epoch
    assert epochs[0][0] != epochs[0][1] and sorted(p for p, _ in epochs[0][0]) == sorted(first)
    assert len({s for _, s in epochs[0][0] + epochs[0][1]}) == 2 * table.num_rows  # every clip its own seed
    fixed = TableSource(table, rows_per_block=8, shuffle=False)
    assert [p for t in fixed.get_read_tasks(1) for b in t() for p in b.column("path").to_pylist()] == \
        table.column("path").to_pylist()


def test_every_pass_has_its_own_order_and_a_resumed_source_draws_the_pass_it_was_in():
    """Two passes per epoch over a 12-row manifest, three epochs: six distinct orders, each a permutation of the
    rows. The order and row seeds of an epoch depend on the seed and the epoch's index only, so a source brought
    to epoch 2 (a resumed run's) draws what the uninterrupted run drew there, not the first epoch again."""
    from workflows.data import TableSource

    table = pa.table({"path": [f"/videos/{i:02d}.mp4" for i in range(12)], "label": np.arange(12) % 3})

    def epoch(source):
        return [(p, s) for t in source.get_read_tasks(1) for b in t()
                for p, s in zip(b.column("path").to_pylist(), b.column("seed").to_pylist())]

    run = TableSource(table, rows_per_block=5, shuffle=True, passes=2, seed=11)
    epochs = [epoch(run) for _ in range(3)]
    orders = [tuple(p for p, _ in e[i:i + 12]) for e in epochs for i in (0, 12)]
    assert all(sorted(order) == table.column("path").to_pylist() for order in orders)
    assert len(set(orders)) == 6
    assert len({s for e in epochs for _, s in e}) == 3 * 24  # every clip of every pass its own seed
    resumed = TableSource(table, rows_per_block=5, shuffle=True, passes=2, seed=11)
    resumed.executions = 2
    assert epoch(resumed) == epochs[2]
    assert epoch(TableSource(table, rows_per_block=5, shuffle=True, passes=2, seed=12)) != epochs[0]


def test_eval_dataset_yields_every_view_of_every_video(data_ray, manifests):
    from evl.video.kinetics import read_manifest
    from workflows.data import eval_dataset
    from workflows.decode_stats import decode_stats

    cfg = config(manifests, num_temporal_views=2, num_spatial_views=3)
    with decode_stats() as stats:
        rows = eval_dataset(cfg, IMAGE, manifests["val"], stats).take_all()
    labels = read_manifest(manifests["val"]).column("label").to_pylist()
    assert len(rows) == 8 * 6
    views = {}
    for row in rows:
        assert row["clip"].shape == (NUM_FRAMES, 3, IMAGE, IMAGE) and row["clip"].dtype == np.uint8
        assert row["label"] == labels[row["video"]]
        views.setdefault(int(row["video"]), set()).add(int(row["view"]))
    assert views == {v: set(range(6)) for v in range(8)}


def test_eval_dataset_skips_and_counts_a_broken_video(data_ray, manifests):
    """The train manifest ends with a truncated file: evaluation goes on without it and counts it. Twice in one
    process, as a sweep's trials one after the other: each run counts only its own failures."""
    from workflows.data import eval_dataset
    from workflows.decode_stats import decode_failures, decode_stats

    broken = manifests["broken"]
    with decode_stats() as first, decode_stats() as second:
        for stats in (first, second):
            rows = eval_dataset(config(manifests), IMAGE, manifests["train"], stats).take_all()
            assert sorted({int(r["video"]) for r in rows}) == list(range(20))  # the 21st row, the broken one, is gone
        for stats in (first, second):
            counts = decode_failures(stats)
            assert (counts["total"], counts["by_dataset"], list(counts["files"])) == (1, {"eval": 1}, [broken])


def test_a_decoders_failures_are_counted_before_its_batch_is_handed_on(data_ray, manifests):
    """`evl eval` once printed no broken video though it had skipped one: a decode task's report sent fire-and-forget
    can still be on its way when the driver reads the count, or be lost with its process. Here the task's process
    is gone the moment its batch is out (an idle worker Ray reaps, a lost spot node): a report sent fire-and-forget
    is lost, a counted one is not."""
    import os

    from workflows.decode_stats import decode_failures, decode_stats

    broken = manifests["broken"]

    @data_ray.remote(max_retries=0)
    def decode_then_vanish(stats: str) -> None:
        from workflows.data import decode_eval_views

        batch = {"path": np.array([broken]), "label": np.array([0]), "num_frames": np.array([16]),
                 "width": np.array([IMAGE]), "height": np.array([IMAGE]), "video": np.array([0])}
        assert list(decode_eval_views(batch, num_frames=NUM_FRAMES, sampling_rate=2, image_size=IMAGE,
                                      temporal_views=1, spatial_views=1, stats=stats)) == []
        os._exit(0)

    with decode_stats() as stats:
        with pytest.raises(data_ray.exceptions.WorkerCrashedError):
            data_ray.get(decode_then_vanish.remote(stats))
        counts = decode_failures(stats)
    assert (counts["total"], list(counts["files"])) == (1, [broken])


def test_pool_size_and_subset(data_ray, manifests):
    from evl.config import ConfigError
    from workflows.data import _subset, decode_pool, decode_pool_size
    from evl.video.kinetics import read_manifest

    assert decode_pool_size(config(manifests, decode_workers=3)) == 3
    fixed = decode_pool(config(manifests, decode_workers=3))
    assert (fixed.min_size, fixed.initial_size, fixed.max_size) == (3, 3, 3)
    cpus = data_ray.cluster_resources()["CPU"]
    free = max(1, int(cpus - 0.5))  # the CPUs 2 trainers x 0.25 leave
    assert decode_pool_size(config(manifests)) == free
    elastic = decode_pool(config(manifests))  # starts on the free CPUs, grows without a cap, keeps one
    assert (elastic.min_size, elastic.initial_size, elastic.max_size) == (1, free, float("inf"))
    capped = decode_pool(config(manifests, max_decode_workers=2))
    assert (capped.min_size, capped.initial_size, capped.max_size) == (1, min(free, 2), 2)
    with pytest.raises(ConfigError, match="set one of them"):
        config(manifests, decode_workers=3, max_decode_workers=4)
    assert decode_pool_size(config(manifests, decode_resources={"decode_node": 0.001})) == 1  # no such node
    table = read_manifest(manifests["train"])
    subset = _subset(table, 8, seed=0)
    assert subset.num_rows == 8 and len(set(subset.column("label").to_pylist())) > 1
    assert _subset(table, 8, seed=0).equals(subset)
