"""A run's folder under `scaling.storage_path` (local or in a store): its name, and the small files beside Ray's
checkpoints that say which MLflow runs it feeds and how it was configured."""

from __future__ import annotations

import pyarrow.fs as pafs

from evl import storage


def read_marker(path: str) -> str | None:
    """The text of a run folder's small file, or None when the file does not exist (the run has not got that
    far). An unreachable store raises `storage.StorageError`: a run is never taken for new because of it."""
    try:
        return storage.read_text(path)
    except storage.NotFound:
        return None


def latest_run(root: str, prefix: str, marker: str) -> str | None:
    """Name of the newest folder `prefix*` under `root` that holds the file `marker`, or None."""
    # Object stores give folders no time: the marker's (written when the run starts) orders them.
    markers = {e.name: storage.info(storage.join(e.path, marker))
               for e in storage.list_dir(root) if e.is_dir and e.name.startswith(prefix)}
    runs = sorted((info.mtime_ns or 0, name) for name, info in markers.items() if info.type == pafs.FileType.File)
    return runs[-1][1] if runs else None


def timestamped(name: str) -> str:
    """`name-YYYYmmdd-HHMMSS`: a fresh folder and MLflow run name for every new run of one config."""
    from datetime import datetime

    return f"{name}-{datetime.now():%Y%m%d-%H%M%S}"


def ray_storage(root: str) -> dict:
    """RunConfig's storage arguments for `root`: in a store, the filesystem with evl.storage's retries and the
    path inside it (Ray would otherwise build its own, without them)."""
    path, fs = storage.filesystem_for_ray(root)
    return {"storage_path": path, "storage_filesystem": fs}
