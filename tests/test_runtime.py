"""ensure_ray: a local instance started for a job gets the logical CPUs the job holds at once, and keeps idle
worker processes for the next evaluation's tasks."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from evl.config import load_config
from workflows.data import cpus_needed

ROOT = Path(__file__).resolve().parent.parent


def test_cpus_needed_counts_trainers_and_decode_actors():
    demo = load_config(ROOT / "configs" / "demo.yaml")
    assert cpus_needed(demo) == 2 * 1.0 + 2  # 2 CPU trainers + data.decode_workers
    auto = load_config(ROOT / "configs" / "vit_b16_8f.yaml", ["scaling.cpus_per_worker=4", "data.decode_workers=null"])
    assert cpus_needed(auto) == 8 * 4 + 1  # at least one decode actor besides the trainers


def test_local_instance_is_sized_for_the_job_and_keeps_idle_workers_for_the_next_tasks():
    """In a fresh process and Ray temp folder (so no running cluster is found), the local instance `ensure_ray`
    starts has more logical CPUs than cores when the job needs them. And while actors hold every CPU (as trainers
    and decode actors do), tasks after a pause run in the idle processes of the ones before instead of fresh ones
    (Ray's default ends those after 1 s, and every evaluation paid for the imports again). One Ray start for both
    checks: each costs ~15 s here."""
    cores = os.cpu_count() or 1
    code = ("import time, os, ray; from workflows.runtime import ensure_ray;"
            f"ensure_ray(min_cpus={cores + 0.5}, include_dashboard=False)\n"
            "cpus = int(ray.cluster_resources()['CPU']); print(cpus)\n"
            "@ray.remote(num_cpus=1)\nclass Busy:\n    def pid(self): return os.getpid()\n"
            "@ray.remote(num_cpus=0)\ndef pid(): return os.getpid()\n"
            "busy = [Busy.remote() for _ in range(cpus)]\n"
            "ray.get([b.pid.remote() for b in busy])\n"
            "first = set(ray.get([pid.remote() for _ in range(3)])); time.sleep(4)\n"
            "print(sorted(first), sorted(set(ray.get([pid.remote() for _ in range(3)])))); ray.shutdown()")
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="ray") as ray_tmp:  # short: Ray's socket paths go here
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": ray_tmp}
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert int(next(line for line in lines if line.isdigit())) == cores + 1  # min_cpus rounded up, above the cores
    first, again = (set(pids.strip("[]").split(", ")) for pids in lines[-1].split("] ["))
    assert first & again, out.stdout  # (a third task may still start a process of its own)
