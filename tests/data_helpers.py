"""Shared helpers for the data tests: real encoded videos (good and broken) and a small Ray session.

Every video here is a real file written with PyAV, so the tests exercise the decoders, not mocks.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import av
import numpy as np

from evl.video.synth import SynthParams, encode_video, write_synth_dataset


def _levels(num_frames: int) -> np.ndarray:
    step = max(1, min(8, 240 // max(1, num_frames - 1)))
    return np.arange(num_frames) * step + 4


def level_frames(num_frames: int, height: int = 40, width: int = 64) -> np.ndarray:
    """Frames whose grey level encodes their index: uint8 [T, H, W, 3].

    Flat frames survive h264 almost exactly, so a decoded frame's mean tells which frame it is.
    (Widths 16/32/48/96/144 trip a decord bug, so the default is one decord handles.)
    """
    levels = _levels(num_frames)
    return np.broadcast_to(levels[:, None, None, None], (num_frames, height, width, 3)).astype(np.uint8).copy()


def frame_index(frame: np.ndarray, num_frames: int) -> int:
    """Inverse of level_frames for one decoded frame [H, W, 3]."""
    return int(np.argmin(np.abs(_levels(num_frames) - float(frame.mean()))))


def write_level_video(path: str | os.PathLike, num_frames: int, height: int = 40, width: int = 64,
                      fps: int = 24, **kwargs) -> str:
    encode_video(path, level_frames(num_frames, height, width), fps=fps, **kwargs)
    return str(path)


def write_audio_only(path: str | os.PathLike, seconds: float = 0.5, rate: int = 16000) -> str:
    """An .mp4 with one AAC audio stream and no video stream."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=rate)
        samples = 1024
        for i in range(int(seconds * rate / samples)):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, samples), np.float32), format="fltp", layout="mono")
            frame.sample_rate = rate
            frame.pts = i * samples
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return str(path)


def write_bad_videos(folder: str | os.PathLike) -> dict[str, str]:
    """Every kind of broken or awkward input, by name -> path. Names starting with 'ok_' are usable."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    good = write_level_video(folder / "ok_good.mp4", 30)
    paths["ok_good"] = good
    paths["zero_bytes"] = str(folder / "zero_bytes.mp4")
    Path(paths["zero_bytes"]).write_bytes(b"")
    data = Path(good).read_bytes()
    paths["truncated"] = str(folder / "truncated.mp4")
    Path(paths["truncated"]).write_bytes(data[: len(data) // 2])
    paths["text"] = str(folder / "text.mp4")
    Path(paths["text"]).write_text("this is not a video\n" * 20)
    paths["audio_only"] = write_audio_only(folder / "audio_only.mp4")
    paths["missing"] = str(folder / "missing.mp4")
    paths["ok_one_frame"] = write_level_video(folder / "ok_one_frame.mp4", 1)
    paths["ok_short"] = write_level_video(folder / "ok_short.mp4", 5)
    paths["ok_odd_width"] = write_level_video(folder / "ok_odd_width.mp4", 12, height=33, width=47,
                                              pix_fmt="yuv444p")
    paths["ok_portrait"] = write_level_video(folder / "ok_portrait.mp4", 12, height=64, width=32)
    spaced = folder / "with spaces" / "ok video with spaces.mp4"
    spaced.parent.mkdir(exist_ok=True)
    shutil.copy(good, spaced)
    paths["ok_spaces"] = str(spaced)
    return paths


def small_synth(root: str | os.PathLike, classes: int = 4, train: int = 4, val: int = 2, frames: int = 24,
                size: int = 32) -> SynthParams:
    params = SynthParams(num_classes=classes, train_per_class=train, val_per_class=val, width=size, height=size,
                         frames=frames, fps=12)
    write_synth_dataset(root, params)
    return params


def report_shards_loop(loop_config: dict):
    """`epochs` passes over this worker's shard; rank 0 reports what every worker saw and the run's decode
    failures (`decode_stats`). (Ray Train hands a train function its config only when it requires one.)"""
    import tempfile

    import ray.train
    import torch.distributed as dist

    from workflows.decode_stats import decode_failures

    import time

    shard = ray.train.get_dataset_shard("train")
    epochs = []
    for _ in range(loop_config["epochs"]):
        start = time.perf_counter()
        seen = {"batches": 0, "labels": [], "shapes": set(), "dtypes": set()}
        for batch in shard.iter_torch_batches(batch_size=2, drop_last=True):
            seen["batches"] += 1
            seen["labels"] += batch["label"].tolist()
            seen["shapes"].add(tuple(batch["clip"].shape))
            seen["dtypes"].add((str(batch["clip"].dtype), str(batch["label"].dtype)))
        epochs.append({k: sorted(v) if isinstance(v, set) else v for k, v in seen.items()})
        epochs[-1]["wall_s"] = time.perf_counter() - start
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, epochs)
    rank = ray.train.get_context().get_world_rank()
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = ray.train.Checkpoint.from_directory(directory) if rank == 0 else None
        ray.train.report({"workers": everyone, "failures": decode_failures(loop_config["decode_stats"])},
                         checkpoint=checkpoint)


@contextlib.contextmanager
def ray_session(num_cpus: int):
    """The test session's local Ray (conftest.shared_ray); reuses (and leaves alone) one that is already running."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    _init_with_retry(ray, num_cpus)
    try:
        _quiet_ray_data()
        yield ray
    finally:
        ray.shutdown()


def _init_with_retry(ray, num_cpus: int, attempts: int = 2) -> None:
    """ray.init, once more if the node fails to start: on a saturated machine the raylet can give up
    waiting for its agents ("Timed out waiting for file .../metrics_agent_port_...")."""
    from workflows.runtime import LOCAL_SYSTEM_CONFIG  # as `evl` starts a local instance

    for attempt in range(attempts):
        try:
            # The dashboard serves the state API that Ray Train's PlacementGroupCleaner polls: without it the
            # workers' placement group of a trial Tune stops (ASHA, or max_t reached) is never removed, and
            # the next trial waits for CPUs forever. Users' `ray.init` starts it too.
            ray.init(num_cpus=num_cpus, include_dashboard=True, log_to_driver=False,
                     runtime_env={"env_vars": {"PYTHONPATH": _repo_root()}}, _system_config=dict(LOCAL_SYSTEM_CONFIG))
            return
        except Exception:  # noqa: BLE001 - Ray raises plain Exception for a node that did not start
            ray.shutdown()
            if attempt == attempts - 1:
                raise


def _quiet_ray_data() -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def _repo_root() -> str:
    return str(Path(__file__).resolve().parent.parent)
