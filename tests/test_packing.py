"""Packed training: several decoders + heads on one backbone pass, each training exactly as it would alone.

One process, DeepSpeed on the CPU with gloo, fp32, the tiny random backbone (EVL-Tiny: 3 blocks)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evl.backbone import FrozenCLIPBackbone
from evl.config import Config, ConfigError, ModelConfig, TrainConfig
from evl.packing import (PACK_MAY_DIFFER, PACK_MUST_MATCH, check_packable, config_fields, group_packable,
                         pack_key)
from evl.training import Trainer, fit

STEPS = 20


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops only lose to thread contention on this shared machine (and one thread keeps runs comparable)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def base_config(**train) -> Config:
    return Config(
        model=ModelConfig(backbone="EVL-Tiny", pretrained=None, num_frames=4, num_classes=4, decoder_num_layers=2,
                          cls_dropout=0.5, decoder_mlp_dropout=0.5),
        train=TrainConfig(**{"batch_size": 4, "micro_batch_size": 4, "num_steps": STEPS, "lr": 1e-3, **train}))


def variant(cfg: Config, **changes) -> Config:
    """`cfg` with `section.key`-free keyword changes: model fields go to the model, the rest to train."""
    model = {k: v for k, v in changes.items() if hasattr(cfg.model, k)}
    train = {k: v for k, v in changes.items() if k not in model}
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model),
                               train=dataclasses.replace(cfg.train, **train))


def random_batches(n: int, clips: int = 4, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 256, (clips, 4, 3, 32, 32), dtype=torch.uint8, generator=g),
             torch.randint(0, 4, (clips,), generator=g)) for _ in range(n)]


# ---- which configs pack ----------------------------------------------------------------------------------------


def test_pack_fields_split_the_config():
    fields = config_fields()
    assert set(PACK_MAY_DIFFER) <= set(fields)  # no typo in the list
    assert set(PACK_MUST_MATCH) == set(fields) - set(PACK_MAY_DIFFER)
    for name in ("model.backbone", "model.pretrained", "model.backbone_seed", "model.num_frames",
                 "data.sampling_rate", "data.rand_augment", "data.min_scale", "train.batch_size",
                 "train.micro_batch_size", "train.num_steps", "train.seed", "train.precision"):
        assert name in PACK_MUST_MATCH, name


def test_check_packable_names_the_first_field_that_must_match():
    cfg = base_config()
    check_packable([cfg])
    check_packable([cfg, variant(cfg, lr=3e-3, decoder_num_layers=1, cls_dropout=0.1, temporal_conv=False,
                                 grad_clip=1.0, warmup_steps=2, weight_decay=0.0, decoder_qkv_dim=32),
                    dataclasses.replace(cfg, name="other")])
    for changes, field in (({"num_frames": 8}, "model.num_frames"), ({"seed": 1}, "train.seed"),
                           ({"batch_size": 8}, "train.batch_size"),
                           ({"micro_batch_size": 2}, "train.micro_batch_size"),
                           ({"num_frames": 8, "seed": 1}, "model.num_frames")):
        with pytest.raises(ConfigError, match=rf"{field} differs .* head 1"):
            check_packable([cfg, variant(cfg, **changes)])
    stride = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, sampling_rate=8))
    with pytest.raises(ConfigError, match="data.sampling_rate differs"):
        check_packable([cfg, variant(cfg, lr=2e-3), stride])
    with pytest.raises(ConfigError, match="at least one"):
        check_packable([])


def test_pack_key_groups_a_grid():
    cfg = base_config()
    grid = [variant(cfg, num_frames=f, decoder_num_layers=d, lr=lr)
            for f in (4, 8) for d in (1, 2) for lr in (1e-3, 2e-3)]
    assert pack_key(grid[0]) == pack_key(grid[3]) != pack_key(grid[4])
    assert group_packable(grid) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    for group in group_packable(grid):
        check_packable([grid[i] for i in group])


def test_trainer_refuses_an_unpackable_list():
    cfg = base_config()
    with pytest.raises(ConfigError, match="train.seed differs"):
        Trainer([cfg, variant(cfg, seed=3)])


# ---- the shared backbone ---------------------------------------------------------------------------------------


def test_deeper_backbone_gives_a_shallow_head_the_same_features():
    """A depth-1 head alone gets its block from a backbone that runs the blocks before it as open_clip wrote them;
    in a pack of depth 3 they run through the SDPA re-implementation. Same arithmetic up to rounding."""
    shallow = FrozenCLIPBackbone("EVL-Tiny", None, 1)
    deep = FrozenCLIPBackbone("EVL-Tiny", None, 3)
    images = torch.randn(8, 3, 32, 32)
    [alone], packed = shallow(images), deep(images)
    for name in ("tokens", "q", "k"):
        a, b = getattr(alone, name), getattr(packed[-1], name)
        assert (a - b).abs().max().item() <= 1e-5 * max(1.0, a.abs().max().item()), name


# ---- exactness -------------------------------------------------------------------------------------------------


def test_pack_trains_each_head_exactly_as_alone():
    """A pack of {depth 1 with gradient clipping, depth 2, depth 2 with another lr and no temporal
    cross-attention}, dropout 0.5, against three single-head runs fed the same batches: the same loss curves and
    final logits per head."""
    base = base_config()
    cfgs = [variant(base, decoder_num_layers=1, grad_clip=0.05), base,
            variant(base, lr=3e-3, temporal_cross_attention=False)]
    batches = random_batches(STEPS)
    probe = random_batches(1, seed=2)[0][0]

    def run(trainer):
        rng = torch.get_rng_state()
        losses = torch.tensor([[loss.item() for loss, _ in trainer.train_micro_batch(c, y)] for c, y in batches])
        assert torch.equal(torch.get_rng_state(), rng)  # the heads' streams never touch the caller's
        logits = trainer.logits(probe)
        assert trainer.step == STEPS
        trainer.close()
        return losses, logits

    pack_losses, pack_logits = run(Trainer(cfgs))
    for i, cfg in enumerate(cfgs):
        losses, [logits] = run(Trainer(cfg))
        assert (pack_losses[:, i] - losses[:, 0]).abs().max().item() <= 1e-5, i
        assert (pack_logits[i] - logits).abs().max().item() <= 1e-5, i
    # The test can tell the heads apart: same init for heads 1 and 2, different lr, switches and dropout draws.
    assert (pack_losses[1:, 1] - pack_losses[1:, 2]).abs().max() > 1e-3
    assert (pack_losses[1:, 0] - pack_losses[1:, 1]).abs().max() > 1e-3


def test_dropout_streams_are_per_head():
    """Two identical heads in one pack draw the same dropout masks (each has its own stream seeded as alone); one
    shared stream would give the second head other masks."""
    cfg = base_config()
    trainer = Trainer([cfg, cfg])
    for clips, labels in random_batches(3):
        (a, _), (b, _) = trainer.train_micro_batch(clips, labels)
        assert torch.equal(a, b)
    trainer.close()


# ---- checkpoints -----------------------------------------------------------------------------------------------


def snapshot(trainer: Trainer) -> list[dict]:
    """Every head's parameters, optimizer state (AdamW's step, exp_avg, exp_avg_sq), lr and scheduler count."""
    out = []
    for head in trainer.heads:
        base = getattr(head.optimizer, "optimizer", head.optimizer)  # ZeRO wraps the torch optimizer
        state = [{k: v.clone() if torch.is_tensor(v) else v for k, v in base.state[p].items()}
                 for group in base.param_groups for p in group["params"]]
        out.append({"params": {k: v.clone() for k, v in head.classifier.state_dict().items()}, "opt": state,
                    "lr": head.lr, "sched": head.scheduler.last_epoch, "step": trainer.step})
    return out


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x["lr"], x["sched"], x["step"]) == (y["lr"], y["sched"], y["step"])
        assert x["params"].keys() == y["params"].keys()
        for k in x["params"]:
            assert torch.equal(x["params"][k], y["params"][k]), k
        assert len(x["opt"]) == len(y["opt"]) > 0
        for s, t in zip(x["opt"], y["opt"]):
            assert s.keys() == t.keys() and {"exp_avg", "exp_avg_sq", "step"} <= s.keys()
            for k in s:
                assert torch.equal(torch.as_tensor(s[k]), torch.as_tensor(t[k])), k


@pytest.mark.parametrize("packed", [False, True], ids=["single", "pack"])
def test_save_load_round_trip_resumes_exactly(packed, tmp_path):
    """Saved at step 3 of a run with accumulation (2 micro-batches a step) and dropout: a fresh trainer loads the
    weights, optimizer state, schedule, step and dropout streams, and trains on exactly as the uninterrupted run."""
    base = base_config(batch_size=8, num_steps=10)
    cfgs = [variant(base, decoder_num_layers=1, lr=2e-3), variant(base, warmup_steps=2)] if packed else base
    batches = random_batches(12)
    run = Trainer(cfgs)
    for clips, labels in batches[:6]:
        run.train_micro_batch(clips, labels)
    assert run.step == 3
    run.save(tmp_path, extra={"step": 3})
    saved = snapshot(run)
    tags = ["state-0", "state-1"] if packed else ["state"]
    assert sorted(p.name for p in tmp_path.glob("state*")) == tags
    assert (tmp_path / "rng-rank0.pt").is_file() and (tmp_path / "latest").is_file() == (not packed)
    uninterrupted = [[loss.item() for loss, _ in run.train_micro_batch(c, y)] for c, y in batches[6:]]

    resumed = Trainer(cfgs)
    fresh = snapshot(resumed)
    assert not torch.equal(fresh[0]["params"]["head.fc.weight"], saved[0]["params"]["head.fc.weight"])
    assert resumed.load(tmp_path) == {"step": 3}
    assert_same(snapshot(resumed), saved)
    assert [[loss.item() for loss, _ in resumed.train_micro_batch(c, y)] for c, y in batches[6:]] == uninterrupted
    assert resumed.step == run.step == 6

    other = Trainer(base if packed else [base, variant(base, lr=2e-3)])  # another head count: refused
    with pytest.raises(FileNotFoundError, match="state"):
        other.load(tmp_path)
    for trainer in (run, resumed, other):
        trainer.close()


# ---- the loop --------------------------------------------------------------------------------------------------


def test_fit_reports_every_head():
    base = base_config(num_steps=4, log_every=2, eval_every=4, checkpoint_every=2)
    trainer = Trainer([variant(base, decoder_num_layers=1, lr=3e-3), variant(base, warmup_steps=2)])
    batches = random_batches(2)
    logs, checkpoints = [], []

    def evaluate():
        views = trainer.gather_views(trainer.evaluate(
            [{"clip": c, "label": y, "video": torch.arange(len(y))} for c, y in batches]))
        assert len(views) == 2
        return [v.result().metrics() for v in views]

    result = fit(trainer, lambda data_pass: ({"clip": c, "label": y} for c, y in batches), evaluate=evaluate,
                 on_log=lambda step, m: logs.append((step, m)), on_checkpoint=lambda s, m: checkpoints.append((s, m)),
                 extra_metrics=lambda: {"decode_failures": 0.0})
    assert [s for s, _ in logs] == [2, 4, 4] and all(len(m) == 2 for _, m in logs)
    (_, window), (_, last), (_, evals) = logs
    for head in window:
        assert {"loss", "train_top1", "lr", "clips_per_s", "data_wait_s", "data_wait_frac", "eta_s", "data_pass",
                "decode_failures"} == head.keys()  # no stale eval values in a training window
    assert window[0]["lr"] != window[1]["lr"] and window[0]["loss"] != window[1]["loss"]
    assert window[0]["clips_per_s"] == window[1]["clips_per_s"] > 0  # the pipeline numbers are shared
    assert all(set(e) == {"val_top1", "val_top5", "val_videos"} for e in evals)
    assert [s for s, _ in checkpoints] == [2, 4]
    assert "val_top1" not in checkpoints[0][1][0] and checkpoints[1][1] == result
    assert result == [{**m, **e} for m, e in zip(last, evals)]

    trainer2 = Trainer([base, base])
    with pytest.raises(TypeError, match="list of 2 metric"):
        fit(trainer2, lambda data_pass: ({"clip": c, "label": y} for c, y in batches),
            evaluate=lambda: {"val_top1": 0.0})
    trainer.close()
    trainer2.close()


# ---- bench/pack.py ---------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "pack.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_pack", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_bench_pack_tiny_run_checks_and_writes_json(tmp_path):
    """A tiny CPU run, in its own process (it builds and destroys its own process group)."""
    out = tmp_path / "pack.json"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, str(BENCH), "--model", "EVL-Tiny", "--depths", "1", "3", "--frames", "4",
                           "--batch", "2", "--classes", "5", "--steps", "2", "--warmup", "1", "--check",
                           "--json", str(out)], check=False, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "pack {1,3}" in proc.stdout and "alone, depth 3" in proc.stdout and "-> pass" in proc.stdout
    result = json.loads(out.read_text())
    assert result["check"]["passed"] and result["losses_finite"] and result["device_type"] == "cpu"
    assert [r["depths"] for r in result["alone"]] == [[1], [3]] and result["pack"]["depths"] == [1, 3]
    assert result["pack"]["clips_per_s_x_heads"] == pytest.approx(2 * result["pack"]["clips_per_s"])
    assert result["speedup"] == pytest.approx(result["pack_clips_per_s_x_heads"] / result["alone_clips_per_s"])
    assert len(result["pack"]["losses"]) == 2 and len(result["pack"]["losses"][0]) == 3  # warm-up + timed steps


def test_bench_pack_helpers():
    bench = load_bench()
    args = bench.parse_args([])
    assert args.model == "EVL-Demo" and args.depths == [1, 2, 3, 4] and args.batch == 4 and args.threads == 1
    with pytest.raises(SystemExit):
        bench.parse_args(["--depths", "2", "2"])
    cfg = bench.head_config(args, 3)
    assert (cfg.model.decoder_num_layers, cfg.model.pretrained, cfg.train.micro_batch_size) == (3, None, 4)
    alone = [{"depths": [d], "batch": 4, "steps": 10, "seconds": s, "clips_per_s": 40 / s, "step_ms": 100 * s,
              "backbone_ms": 50.0, "losses": [[1.0, 2.0]]} for d, s in ((1, 1.0), (2, 3.0))]
    pack = {"depths": [1, 2], "heads": 2, "batch": 4, "steps": 10, "seconds": 2.0, "clips_per_s": 20.0, "step_ms": 200.0,
            "backbone_ms": 50.0, "clips_per_s_x_heads": 40.0, "losses": [[1.0, 2.0], [1.0, 2.5]]}
    summary = bench.summarise(pack, alone)
    assert summary["alone_clips_per_s"] == pytest.approx(80 / 4.0) and summary["speedup"] == pytest.approx(2.0)
    check = bench.check_losses(pack, alone, 1e-4)
    assert check["max_abs_loss_diff"] == [0.0, 0.5] and not check["passed"]
    text = bench.format_table(pack, alone, summary, check, "title")
    assert "2.00x" in text and "FAIL" in text and "pack {1,2}" in text
