"""Each run's own count of the videos its decoders dropped, and of the decode actors delivering clips.

Its own module, importing only Ray: the counter is an actor process of its own, which imports the module its
class lives in (workflows.data would bring Ray Data, PyAV and decord along: seconds of CPU per run).
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

STATS_NAME = "evl_decode_stats"
STATS_NAMESPACE = "evl"
MAX_LISTED_FAILURES = 1000
DECODERS_WINDOW_S = 30.0  # a decode actor counts as in use if it delivered a batch this recently


@ray.remote(num_cpus=0)
class DecodeStats:
    """Counts of videos that could not be decoded, per dataset, and which files (bounded); and which train
    decode actors delivered clips lately, and on which nodes (the elastic pool's size as it really is)."""

    def __init__(self, max_files: int = MAX_LISTED_FAILURES):
        self.max_files = max_files
        self.total = 0
        self.by_dataset: dict[str, int] = {}
        self.files: dict[str, str] = {}
        self.unlisted = 0
        self.last_seen: dict[str, tuple[str, float]] = {}  # decode actor id -> (node id, time of its last batch)

    def seen(self, actor_id: str, node_id: str) -> None:
        self.last_seen[actor_id] = (node_id, time.monotonic())

    def decoders(self, window_s: float = DECODERS_WINDOW_S) -> dict[str, int]:
        """{node id: decode actors there that delivered a batch in the last `window_s` seconds}."""
        now, out = time.monotonic(), {}
        for node, when in self.last_seen.values():
            if now - when <= window_s:
                out[node] = out.get(node, 0) + 1
        return out

    def record(self, dataset: str, failures: list[tuple[str, str]]) -> None:
        self.total += len(failures)
        self.by_dataset[dataset] = self.by_dataset.get(dataset, 0) + len(failures)
        for path, reason in failures:
            if path in self.files or len(self.files) < self.max_files:
                self.files[path] = reason
            else:
                self.unlisted += 1

    def summary(self) -> dict:
        return {"total": self.total, "by_dataset": dict(self.by_dataset), "files": dict(self.files),
                "unlisted": self.unlisted}


@contextlib.contextmanager
def decode_stats() -> Iterator[str]:
    """A DecodeStats actor of one run's own, for as long as the block runs; its name, which the run's datasets,
    decode actors and trainers are given.

    One per run, never one per cluster: runs that share a cluster (a sweep's trials side by side, jobs of
    several users) or a process (a sweep's trials one after the other, `evl eval` after `evl train`) each count
    only their own failures, and no run's counter dies with another run. It lives on this process's node (a
    decode node may be a spot instance that goes away mid-run) and ends with the block.
    """
    name = f"{STATS_NAME}-{uuid.uuid4().hex[:12]}"
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    actor = DecodeStats.options(name=name, namespace=STATS_NAMESPACE, scheduling_strategy=here).remote()
    try:
        yield name
    finally:
        ray.kill(actor)


def stats_actor(name: str):
    """The run's DecodeStats actor, by the name decode_stats() gave it."""
    return ray.get_actor(name, namespace=STATS_NAMESPACE)


def decode_failures(stats: str) -> dict:
    """The run's (`stats`: its decode_stats name) failures: {"total": int, "by_dataset": {"train": n, ...},
    "files": {path: reason} (at most 1000), "unlisted": int}. Callable from the driver or any Ray worker (e.g. the
    trainer's rank 0, for a metric)."""
    return ray.get(stats_actor(stats).summary.remote())


def decoders_in_use(stats: str) -> dict[str, int]:
    """{node id: the run's train decode actors there that delivered a batch in the last 30 s}."""
    return ray.get(stats_actor(stats).decoders.remote())
