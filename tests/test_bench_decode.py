"""The decode benchmark runs end to end (tiny sizes, transcoded copies too), so it cannot rot."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_runs_and_reports_every_method(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "bench" / "decode.py"), "--cache", str(tmp_path / "videos"),
           "--num-videos", "2", "--size", "64", "48", "--seconds", "2", "--fps", "12", "--frames", "4",
           "--stride", "4", "--crop", "32", "--workers", "1", "--clips", "2", "--warmup", "1", "--json", str(out),
           "--transcode", "32"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "per core" in done.stdout and "evl vs reference" in done.stdout
    assert "evl-transcoded vs evl on the originals" in done.stdout and "target 3x" in done.stdout
    report = json.loads(out.read_text())
    assert [r["method"] for r in report["results"]] == ["reference", "decord", "evl", "evl-transcoded"]
    for r in report["results"]:
        assert r["clips"] == 2 and r["clips_per_s"] > 0 and r["decode_ms_per_clip"] > 0
    assert set(report["speedup"]) == {"decord", "evl"}
    assert report["setup"]["video_frames"] == 24 and report["setup"]["size"] == [64, 48]
    assert report["setup"]["transcoded"]["size"] == [42, 32]  # short side 32, aspect kept, even
    assert set(report["transcoded_vs_original"]) == {"evl-transcoded"}
    assert set(report["transcode_target"]) == {"target_per_core", "1"}
