"""ensure_ray: a local instance started for a job gets the logical CPUs the job holds at once."""

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


def test_local_instance_is_sized_for_the_job():
    """In a fresh process and Ray temp folder (so no running cluster is found): more logical CPUs than cores
    when the job needs them."""
    code = ("import ray; from workflows.runtime import ensure_ray; ensure_ray(min_cpus=37.5, include_dashboard=False);"
            "print(int(ray.cluster_resources()['CPU'])); ray.shutdown()")
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="ray") as ray_tmp:  # short: Ray's socket paths go here
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": ray_tmp}
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "38"
