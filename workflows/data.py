"""Ray Data pipelines that turn a manifest into clips for Ray Train.

train_dataset: manifest rows -> seeded shuffle (re-drawn every epoch) -> decode + augment on a pool of
CPU actors -> rows {"clip": uint8 [T, 3, S, S], "label": int64}; with data.deterministic (default) the same
seed gives every rank the same clips in the same order.
eval_dataset: every test view of every video -> rows {"clip", "label", "video", "view"}.

Clips stay uint8 (the model normalises on its device) and move in blocks of `data.decode_batch_size`
clips, so the object store holds a few MB per block in flight. Videos that fail to decode are dropped,
counted in the run's own named actor (workflows.decode_stats), and never stop the job.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from evl.config import Config
from evl.video.decode import VideoError
from evl.video.kinetics import read_manifest
from workflows.decode_stats import stats_actor

_INPUT_COLUMNS = ["path", "label", "num_frames", "width", "height"]


# --------------------------------------------------------------------------------------------------------------
# Decoding UDFs (one instance per actor)


class _Decoder:
    """Shared set-up: single-threaded torch (one actor = one core) and a handle on the run's stats actor."""

    dataset = "train"

    def __init__(self, short_side: int | None, stats: str):
        import torch

        torch.set_num_threads(1)
        self.short_side = short_side
        self.stats = stats_actor(stats)

    def _report(self, failures: list[tuple[str, str]]) -> None:
        """Waits until the run's counter has them: a decoder's batch may be the last its process hands on (the
        dataset ends and the driver reads the count, a task worker is reaped, a spot node goes), and a call
        still on its way then is lost or overtaken. Failures are rare, so the wait almost never happens."""
        if failures:
            ray.get(self.stats.record.remote(self.dataset, failures))

    def _frames(self, row: dict, indices: np.ndarray) -> np.ndarray:
        from evl.video.decode import read_frames

        size = (int(row["width"]), int(row["height"]))
        return read_frames(row["path"], indices, self.short_side, size=size)  # [N, H, W, 3]


def _rows(batch: dict[str, np.ndarray]):
    keys = list(batch)
    for values in zip(*(batch[k] for k in keys)):
        yield dict(zip(keys, values))


def _failure(row: dict, error: Exception) -> tuple[str, str]:
    if isinstance(error, VideoError):
        return error.path, error.reason
    return str(row["path"]), f"{type(error).__name__}: {error}"


class TrainDecoder(_Decoder):
    """Manifest rows -> {"clip": uint8 [B, T, 3, S, S], "label": int64 [B]} (B <= rows in).

    Each row's frames and augmentation are drawn from its "seed" column (TableSource), so a clip depends on
    the run's seed and its place in the epoch, not on which actor decodes it."""

    def __init__(self, num_frames: int, sampling_rate: int, image_size: int, rand_augment: str | None,
                 scale: tuple[float, float], short_side: int | None, stats: str):
        super().__init__(short_side, stats)
        from evl.video.transforms import TrainTransform

        self.num_frames, self.sampling_rate, self.image_size = num_frames, sampling_rate, image_size
        self.transform = TrainTransform(image_size, rand_augment, scale)
        self.actor_id = ray.get_runtime_context().get_actor_id()

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        """Yields nothing when every video of the batch failed (an empty tensor column cannot go to Arrow)."""
        from evl.video.sampling import train_indices

        clips, labels, failures = [], [], []
        for row in _rows(batch):
            try:
                rng = np.random.default_rng(int(row["seed"]))
                indices = train_indices(int(row["num_frames"]), self.num_frames, self.sampling_rate, rng)
                clips.append(self.transform(self._frames(row, indices), rng).numpy())
                labels.append(int(row["label"]))
            except Exception as e:  # noqa: BLE001 - one bad video must not stop training
                failures.append(_failure(row, e))
        self._report(failures)
        # Ask for the node each time: Ray restarts an actor whose node was lost on another node, same id.
        self.stats.seen.remote(self.actor_id, ray.get_runtime_context().get_node_id())
        if clips:
            yield {"clip": np.stack(clips), "label": np.asarray(labels, dtype=np.int64)}


class EvalDecoder(_Decoder):
    """Manifest rows -> every test view: {"clip": uint8 [B*V, T, 3, S, S], "label", "video", "view"}."""

    dataset = "eval"

    def __init__(self, num_frames: int, sampling_rate: int, image_size: int, temporal_views: int,
                 spatial_views: int, stats: str):
        super().__init__(None, stats)  # evl.video.views decodes at full size, then resizes as the reference does
        import cv2

        cv2.setNumThreads(1)  # the resize: one core per actor, as torch above
        self.num_frames, self.sampling_rate, self.image_size = num_frames, sampling_rate, image_size
        self.temporal_views, self.spatial_views = temporal_views, spatial_views

    def _views(self, row: dict) -> np.ndarray:
        from evl.video.views import video_test_views

        return video_test_views(row["path"], self.num_frames, self.sampling_rate, self.temporal_views,
                                self.spatial_views, self.image_size, video_frames=int(row["num_frames"]),
                                size=(int(row["width"]), int(row["height"]))).numpy()  # [Vt*Vs, T, 3, S, S]

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        out = {"clip": [], "label": [], "video": [], "view": []}
        failures = []
        for row in _rows(batch):
            try:
                views = self._views(row)
            except Exception as e:  # noqa: BLE001
                failures.append(_failure(row, e))
                continue
            n = len(views)
            out["clip"].append(views)
            out["label"].append(np.full(n, row["label"], np.int64))
            out["video"].append(np.full(n, row["video"], np.int64))
            out["view"].append(np.arange(n, dtype=np.int64))
        self._report(failures)
        if out["clip"]:
            yield {k: np.concatenate(v) for k, v in out.items()}


# --------------------------------------------------------------------------------------------------------------
# Reading the manifest


class TableSource(Datasource):
    """Rows of an in-memory Arrow table as read tasks of `rows_per_block` rows, reshuffled per execution.

    Ray Data plans (and so calls get_read_tasks) at every execution, i.e. every epoch, so `shuffle=True`
    draws a fresh permutation of all rows each epoch without an all-to-all shuffle stage. A read task only
    hands over a few rows of metadata, so it asks for no CPU: the decode actors may hold every CPU without
    starving the reads (with CPU-bound reads or shuffles, a pool holding all CPUs deadlocks).

    With a `seed`, execution e draws its order from (seed, e) and gives every row a "seed" column of its own
    from the same stream: the clip a row becomes (frames, augmentation) is then fixed by the seed and its place
    in the epoch, whichever decode actor takes it.
    """

    def __init__(self, table: pa.Table, rows_per_block: int, shuffle: bool = False, passes: int = 1,
                 seed: int | None = None):
        self.table = table
        self.rows_per_block = max(1, rows_per_block)
        self.shuffle = shuffle
        self.passes = passes  # one execution walks the rows this many times, each pass with its own order
        self.seed = seed
        self.executions = 0

    def estimate_inmemory_data_size(self) -> int:
        return self.table.nbytes * self.passes

    def get_name(self) -> str:
        return "ShuffledManifest" if self.shuffle else "Manifest"

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        n = self.table.num_rows
        rng = np.random.default_rng(None if self.seed is None else (self.seed, self.executions))
        self.executions += 1
        passes = [rng.permutation(n) if self.shuffle else np.arange(n) for _ in range(self.passes)]
        order = np.concatenate(passes)
        row_seeds = rng.integers(0, 2**63, size=len(order)) if self.seed is not None else None
        tasks = []
        for start in range(0, len(order), self.rows_per_block):
            # take() copies: a slice would pickle the whole table's buffers into every task
            chunk = self.table.take(pa.array(order[start:start + self.rows_per_block]))
            if row_seeds is not None:
                chunk = chunk.append_column("seed", pa.array(row_seeds[start:start + self.rows_per_block]))
            meta = BlockMetadata(num_rows=chunk.num_rows, size_bytes=chunk.nbytes, input_files=None,
                                 exec_stats=None)
            tasks.append(ReadTask(functools.partial(_identity_block, chunk), meta, schema=chunk.schema))
        return tasks


def _identity_block(chunk: pa.Table) -> list[pa.Table]:
    return [chunk]


def _read(table: pa.Table, rows_per_block: int, shuffle: bool, passes: int = 1,
          seed: int | None = None) -> ray.data.Dataset:
    # Reads ask for no CPU (they only slice an in-memory table), so cap how many run at once: otherwise Ray
    # starts a worker process per block.
    return ray.data.read_datasource(TableSource(table, rows_per_block, shuffle, passes, seed), num_cpus=0,
                                    concurrency=2)


def _subset(table: pa.Table, limit: int | None, seed: int) -> pa.Table:
    """A seeded random subset (manifests are sorted by class, so the first rows would be few classes)."""
    if not limit or limit >= table.num_rows:
        return table
    keep = np.sort(np.random.default_rng(seed).choice(table.num_rows, limit, replace=False))
    return table.take(pa.array(keep))


# --------------------------------------------------------------------------------------------------------------
# Sizing


def decode_pool_size(cfg: Config) -> int:
    """Decode actors to start with: data.decode_workers, else the CPUs the trainers leave free now (at least 1,
    at most data.max_decode_workers).

    With data.decode_resources set (decode pinned to some nodes), the CPUs of those nodes count.
    """
    if cfg.data.decode_workers:
        return cfg.data.decode_workers
    wanted = cfg.data.decode_resources
    if wanted:
        cpus = sum(node["Resources"].get("CPU", 0) for node in ray.nodes()
                   if node.get("Alive") and all(k in node["Resources"] for k in wanted))
        free = max(1, int(cpus))
    else:
        free = max(1, math.floor(ray.cluster_resources().get("CPU", 1) - trainer_cpus(cfg)))
    return min(free, cfg.data.max_decode_workers or free)


def decode_pool(cfg: Config) -> ray.data.ActorPoolStrategy:
    """The train decode actors: a fixed pool of data.decode_workers, else an elastic one.

    The elastic pool starts at decode_pool_size, keeps at least one actor, and grows (up to
    data.max_decode_workers, if set) while its actors are all busy -- that is, while the trainers take clips as
    fast as they come -- onto any CPUs free then, nodes that joined the cluster included; Ray Data's
    backpressure keeps it from decoding ahead of the trainers, and idle actors are let go. An actor whose node
    is lost (a spot reclaim) is restarted by Ray elsewhere and its batch retried."""
    if cfg.data.decode_workers:
        return ray.data.ActorPoolStrategy(size=cfg.data.decode_workers, max_tasks_in_flight_per_actor=2)
    return ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.data.max_decode_workers,
                                      initial_size=decode_pool_size(cfg), max_tasks_in_flight_per_actor=2)


def trainer_cpus(cfg: Config) -> float:
    return cfg.scaling.num_workers * cfg.scaling.cpus_per_worker


def cpus_needed(cfg: Config) -> float:
    """Logical CPUs one training run holds at once: its trainers plus at least one decode actor each asking
    for a CPU (evaluation actors ask for none)."""
    return trainer_cpus(cfg) + (cfg.data.decode_workers or 1)


def _rows_per_block(num_rows: int, pool: int, batch_size: int) -> int:
    """Input rows per actor task: big enough to amortise task overhead, small enough that every actor
    gets several tasks per epoch (load balance) and the last tasks of an epoch are short."""
    return int(np.clip(num_rows // (4 * pool), batch_size, 16 * batch_size))


def _limit_block_bytes(ds: ray.data.Dataset, rows: int, clip_shape: tuple[int, ...]) -> None:
    """Emit output blocks of about `rows` clips (Ray's default buffers up to 128 MiB per block)."""
    ds.context.target_max_block_size = max(1 << 20, rows * int(np.prod(clip_shape)))


# --------------------------------------------------------------------------------------------------------------
# Datasets


def train_dataset(cfg: Config, image_size: int, stats: str) -> ray.data.Dataset:
    """Rows {"clip": uint8 [T, 3, S, S], "label": int64}, reshuffled at every epoch (each execution).

    One epoch (one iteration of a shard) = data.passes_per_epoch passes over the manifest. stats: the run's
    decode_stats(), where the decode actors count the videos they drop.
    """
    if not cfg.data.train_manifest:
        raise ValueError("data.train_manifest is not set")
    table = _subset(read_manifest(cfg.data.train_manifest), cfg.data.max_train_videos, cfg.train.seed)
    table = table.select(_INPUT_COLUMNS)
    pool, batch = decode_pool_size(cfg), cfg.data.decode_batch_size
    rows = _rows_per_block(table.num_rows, pool, batch)
    ds = _read(table, rows, shuffle=True, passes=cfg.data.passes_per_epoch, seed=cfg.train.seed)
    ds = ds.map_batches(
        TrainDecoder,
        fn_constructor_kwargs={
            "num_frames": cfg.model.num_frames, "sampling_rate": cfg.data.sampling_rate,
            "image_size": image_size, "rand_augment": cfg.data.rand_augment,
            "scale": (cfg.data.min_scale, cfg.data.max_scale), "short_side": cfg.data.decode_short_side,
            "stats": stats},
        batch_size=batch,
        batch_format="numpy",
        compute=decode_pool(cfg),
        num_cpus=1,
        resources=dict(cfg.data.decode_resources) or None,
    )
    _limit_block_bytes(ds, batch, (cfg.model.num_frames, 3, image_size, image_size))
    return ds


def ingest_options(cfg: Config) -> dict:
    """Ray Data options for Ray Train's DataConfig, which replaces a dataset's own. With data.deterministic the
    train clips leave in the order of the epoch's permutation, so the split hands every rank the same clips in
    every run with this seed; otherwise whichever is decoded first goes first."""
    import ray.train

    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = cfg.data.deterministic
    return {"train": options}


def eval_dataset(cfg: Config, image_size: int, manifest_path: str, stats: str) -> ray.data.Dataset:
    """Every test view of every video: rows {"clip": uint8 [T, 3, S, S], "label", "video", "view"} (int64).

    video: the row index in the manifest (average scores per video); view: temporal * spatial index.
    Decoding runs as Ray tasks, not actors: an evaluation every few thousand steps would otherwise start a
    pool of actor processes each time (seconds, more than a small validation set takes to decode), where
    tasks reuse Ray's idle workers (kept between evaluations by a local instance: workflows.runtime). They ask
    for no CPU: evaluation runs while the training loop waits, on the CPUs the (then idle) train decode actors
    hold, so the two never wait on each other. stats: the run's decode_stats().
    """
    table = read_manifest(manifest_path).select(_INPUT_COLUMNS)
    table = table.append_column("video", pa.array(np.arange(table.num_rows, dtype=np.int64)))
    pool, batch = decode_pool_size(cfg), cfg.data.decode_batch_size
    ds = _read(table, _rows_per_block(table.num_rows, pool, batch), shuffle=False)
    ds = ds.map_batches(
        decode_eval_views,
        fn_kwargs={
            "num_frames": cfg.model.num_frames, "sampling_rate": cfg.data.sampling_rate, "image_size": image_size,
            "temporal_views": cfg.data.num_temporal_views, "spatial_views": cfg.data.num_spatial_views,
            "stats": stats},
        batch_size=batch,
        batch_format="numpy",
        compute=ray.data.TaskPoolStrategy(size=pool),
        num_cpus=0,
        resources=dict(cfg.data.decode_resources) or None,
    )
    views = cfg.data.num_temporal_views * cfg.data.num_spatial_views
    _limit_block_bytes(ds, batch * views, (cfg.model.num_frames, 3, image_size, image_size))
    return ds


def decode_eval_views(batch: dict[str, np.ndarray], **kwargs) -> Iterator[dict[str, np.ndarray]]:
    """The eval decode task: EvalDecoder is cheap to build, so each task builds its own."""
    yield from EvalDecoder(**kwargs)(batch)
