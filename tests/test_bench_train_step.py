"""bench/train_step.py: a --tiny run on the CPU produces every row, the JSON and a passing numerics check; its
pure helpers do what the table relies on."""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "train_step.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_train_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench = load_bench()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One --tiny run of every case with --check, in its own process (it builds its own process group: the
    variables another test's group left in this process's environment would point it at a port in use)."""
    out = tmp_path_factory.mktemp("bench") / "train_step.json"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--check", "--steps", "2", "--warmup", "1",
                           "--device", "cpu", "--json", str(out)],
                          check=False, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def test_tiny_run_table_lists_every_case_and_the_check(tiny_run):
    stdout, _ = tiny_run
    assert "EVL training step" in stdout and "TINY backbone EVL-Tiny" in stdout
    for name in bench.CASES:
        assert any(line.startswith(name + " ") for line in stdout.splitlines()), name
    assert "numerics: fast-path logits vs fp32 model" in stdout
    assert "FAIL" not in stdout


def test_tiny_run_json_has_every_case_measured(tiny_run):
    _, result = tiny_run
    assert result["tiny"] and result["device_type"] == "cpu" and not result["comparable_to_reference"]
    rows = {r["case"]: r for r in result["results"]}
    assert list(rows) == list(bench.CASES)
    for row in rows.values():
        assert row["clips_per_s"] > 0 and row["frames_per_s"] == pytest.approx(row["clips_per_s"] * row["frames"])
        assert row["backbone"] == "EVL-Tiny" and row["peak_gib"] is None  # no GPU memory on a CPU
        assert row["verdict"] in ("n/a", "-")
    assert rows["B16-8f-backbone"]["kind"] == rows["L14-8f-backbone"]["kind"] == "backbone_forward"
    assert [rows[n]["batch"] for n in ("B16-8f", "B16-16f", "B16-32f")] == [4, 2, 1]  # same frames per step
    train = [r for r in rows.values() if r["kind"] == "train_step"]
    assert all(r["loss_finite"] and r["of_ceiling"] > 0 for r in train)


def test_tiny_run_numerics_check_passed(tiny_run):
    _, result = tiny_run
    assert result["check_passed"] is True
    checks = {c["case"]: c for c in result["checks"]}
    assert sorted(checks) == sorted(n for n, c in bench.CASES.items() if c.train)
    for c in checks.values():  # CPU: fp32 against fp32
        assert c["passed"] and c["path"] == "backbone fp32, decoder fp32" and c["rel_l2"] <= 1e-5


def test_train_case_frees_its_engine():
    """Each case must leave nothing behind (DeepSpeed's gradient hooks keep the decoder and optimizer state alive
    until the engine is destroyed): on a GPU it would count in every later case's peak memory."""

    def live_parameters():
        gc.collect()
        return sum(type(o) is torch.nn.Parameter for o in gc.get_objects())

    before = live_parameters()
    row, check = bench.run_train_case(bench.CASES["B16-8f"], bench.parse_args(["--tiny", "--steps", "1", "--check"]),
                                      torch.device("cpu"))
    assert row["clips_per_s"] > 0 and check["passed"]
    assert live_parameters() == before


# ---- pure helpers ----------------------------------------------------------------------------------------------


def test_batch_keeps_frames_per_step():
    assert [bench.batch_for(f, 32) for f in (8, 16, 32)] == [32, 16, 8]
    assert bench.batch_for(32, 2) == 1  # never zero clips


def test_parse_args_defaults():
    full = bench.parse_args([])
    assert full.cases == list(bench.CASES) and full.batch == 32 and full.threads is None
    tiny = bench.parse_args(["--tiny", "--cases", "B16-8f"])
    assert tiny.batch == 4 and tiny.threads == 1 and tiny.cases == ["B16-8f"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--cases", "B16-9f"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--steps", "0"])


def test_config_for_cases():
    args = bench.parse_args([])
    cfg = bench.config_for(bench.CASES["B16-32f"], args)
    assert (cfg.model.backbone, cfg.model.num_frames, cfg.model.pretrained) == ("ViT-B-16", 32, None)
    assert cfg.train.micro_batch_size == cfg.train.batch_size == 8  # one micro-batch per optimizer step
    assert cfg.model.num_classes == 400 and cfg.model.decoder_num_layers == 4
    tiny = bench.config_for(bench.CASES["L14-8f"], bench.parse_args(["--tiny"]))
    assert tiny.model.backbone == "EVL-Tiny" and tiny.model.decoder_num_layers == 2


def test_cpu_model_from_cpuinfo():
    assert bench.cpu_model("processor\t: 0\nmodel name\t: AMD EPYC 7R13 Processor\n") == "AMD EPYC 7R13 Processor"
    assert bench.cpu_model("processor : 0\nModel : Raspberry Pi 4\n") == "Raspberry Pi 4"
    assert bench.cpu_model("")  # falls back to something, never empty


def test_compare_logits():
    ref = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    same = bench.compare_logits(ref.clone(), ref)
    assert same["max_abs_diff"] == 0 and same["rel_l2"] == 0 and same["top1_agreement"] == 1
    off = bench.compare_logits(ref + torch.tensor([[0.0, 0.0], [0.0, 3.0]]), ref)
    assert off["max_abs_diff"] == 3 and off["max_abs_ref"] == 3
    assert off["rel_l2"] == pytest.approx(3 / ref.norm().item()) and off["top1_agreement"] == 0.5


def test_ceiling_fraction_pairs_rows_by_backbone():
    rows = [{"case": "B16-8f", "kind": "train_step", "frames_per_s": 4000.0},
            {"case": "L14-8f", "kind": "train_step", "frames_per_s": 1000.0},
            {"case": "B16-32f", "kind": "train_step", "frames_per_s": 2000.0},
            {"case": "B16-8f-backbone", "kind": "backbone_forward", "frames_per_s": 8000.0}]
    bench.add_ceiling_fraction(rows)
    assert [r["of_ceiling"] for r in rows] == [0.5, None, 0.25, None]  # no L/14 backbone row was run


def row(clips_per_s, peak_gib, case="B16-8f"):
    c = bench.CASES[case]
    return {"clips_per_s": clips_per_s, "peak_gib": peak_gib, "target_clips_per_s": c.target_clips_per_s,
            "target_peak_gib": c.target_peak_gib}


def test_verdict_needs_speed_and_memory():
    assert bench.verdict(row(1200, 6.0), comparable=True) == "meets"
    assert bench.verdict(row(900, 6.0), comparable=True) == "MISSES"
    assert bench.verdict(row(1200, 7.0), comparable=True) == "MISSES"  # faster, but above the reference's peak
    assert bench.verdict(row(1200, 6.0), comparable=False) == "n/a"
    assert bench.verdict(row(50, None, "B16-16f"), comparable=True) == "-"  # no target for this case


def test_format_table():
    r = {"case": "L14-8f", "backbone": "ViT-L-14", "frames": 8, "batch": 32, "clips_per_s": 300.0,
         "frames_per_s": 2400.0, "step_ms": 106.7, "peak_gib": 12.5, "of_ceiling": 0.9, "reference_clips_per_s": 70,
         "reference_peak_gib": 19.6, "x_reference": 300 / 70, "target_clips_per_s": 280, "target_peak_gib": 19.6,
         "verdict": "meets"}
    check = {"case": "L14-8f", "path": "backbone bf16, decoder bf16", "clips": 8, "max_abs_diff": 0.01,
             "max_abs_ref": 4.0, "rel_l2": 0.004, "tolerance": 0.05, "top1_agreement": 1.0, "passed": True}
    text = bench.format_table([r], [check], "title")
    line = next(ln for ln in text.splitlines() if ln.startswith("L14-8f ") and "ViT-L-14" in ln)
    for cell in ("300.0", "12.50", "90%", "70", "19.6", "4.29", ">=280, <=19.6G", "meets"):
        assert cell in line, cell
    assert "pass" in text.splitlines()[-1]
