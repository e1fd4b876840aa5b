"""Starting or joining Ray, once per process, for every workflow."""

from __future__ import annotations

import os


def ensure_ray(address: str | None = None, **init_kwargs) -> None:
    """Connect to Ray unless already connected.

    address: a cluster address ("auto", "ray://host:10001", "host:6379"); default $RAY_ADDRESS, else a
    running local cluster, else a new local instance sized to this machine. Extra keyword arguments go to
    `ray.init` (e.g. num_cpus for tests); they are ignored when Ray is already up.
    """
    import ray

    if ray.is_initialized():
        return
    ray.init(address=address or os.environ.get("RAY_ADDRESS") or None, **init_kwargs)
