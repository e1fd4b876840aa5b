"""`evl demo --quick` as a user runs it, in a fresh process: every stage, and a console a person can read."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

PROJECT_LINE = re.compile(r"^(\[\d/4\] |  |run |demo finished|$)")


def test_quick_demo_prints_only_the_projects_story(tmp_path):
    env = {**os.environ, "EVL_LOG_DIR": str(tmp_path / "logs")}
    env.pop("MLFLOW_TRACKING_URI", None)
    evl = Path(sys.executable).parent / "evl"
    proc = subprocess.run([str(evl), "demo", "--quick", "--data", str(tmp_path / "synth")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) <= 39, proc.stdout  # `make demo` adds its own command line: at most 40 in all
    assert proc.stderr == ""
    strangers = [line for line in lines if not PROJECT_LINE.match(line)]
    assert not strangers, strangers  # no Ray, DeepSpeed, MLflow or warnings chatter
    stages = [line[:5] for line in lines if line.startswith("[")]
    assert stages == ["[1/4]", "[2/4]", "[3/4]", "[4/4]"]
    assert any(re.match(r"  step 20/20  loss \d", line) for line in lines)
    assert [line for line in lines if "validation top-1" in line and line.startswith("  step ")]
    assert any(line.startswith("  see it: mlflow ui --backend-store-uri sqlite:///") for line in lines)
    assert any("workflowType=machine_learning" in line for line in lines)
    log = Path(next(line for line in lines if "library logs:" in line).split("library logs: ")[1])
    log = log if log.is_absolute() else tmp_path / log
    chatter = log.read_text()
    assert "ray" in chatter.lower() and len(chatter.splitlines()) > len(lines)  # the chatter went there
