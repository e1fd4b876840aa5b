"""Starting or joining Ray, once per process, for every workflow."""

from __future__ import annotations

import logging
import math
import os

log = logging.getLogger("evl.runtime")

# Ray settings of a local instance started here. Ray ends an idle worker process after 1 s whenever its node
# runs more workers than it has CPUs, which a training run always does (trainers, decode actors, Ray's own
# actors): every evaluation's decode tasks then started fresh processes that imported torch again, seconds per
# evaluation for a few videos. Idle workers are kept for 10 minutes instead.
LOCAL_SYSTEM_CONFIG = {"idle_worker_killing_time_threshold_ms": 10 * 60 * 1000}


def ensure_ray(address: str | None = None, min_cpus: float = 0, **init_kwargs) -> None:
    """Connect to Ray unless already connected.

    address: a cluster address ("auto", "ray://host:10001", "host:6379"); default $RAY_ADDRESS, else a
    running local cluster, else a new local instance sized to this machine. Extra keyword arguments go to
    `ray.init` (e.g. num_cpus for tests); they are ignored when Ray is already up.

    min_cpus: the logical CPUs the job needs at once (trainers plus decode actors). A local instance started
    here gets at least that many, sharing the cores: otherwise `evl train` of a 2-worker config on a 2-core
    laptop would wait forever for a CPU for its decode actors. A running cluster is joined as it is, with a
    warning when it is smaller than that (an autoscaling cluster may still grow).
    """
    import ray

    from workflows import console

    if ray.is_initialized():
        return
    # Workers' output (DeepSpeed, Ray Train, warnings) stays in Ray's session logs unless --verbose.
    init_kwargs.setdefault("log_to_driver", console.verbose())
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None and min_cpus and "num_cpus" not in init_kwargs:
        try:
            # (a copy: ray.init adds keys of its own to the dict it is given)
            ray.init(num_cpus=max(math.ceil(min_cpus), os.cpu_count() or 1),
                     _system_config=dict(LOCAL_SYSTEM_CONFIG), **init_kwargs)
            return
        except ValueError as e:  # a local cluster started with `ray start` is running: join it instead
            if "existing cluster" not in str(e):
                raise
    ray.init(address=address, **init_kwargs)
    cpus = ray.cluster_resources().get("CPU", 0)
    if cpus < min_cpus:
        log.warning("the Ray cluster has %g CPUs but this job needs %g at once (trainers plus decode actors); "
                    "it waits until the cluster grows", cpus, min_cpus)
