"""The training step without Ray: one process, DeepSpeed on the CPU with gloo."""

import json
import math

import pytest
import torch

from evl.config import Config, ConfigError, ModelConfig, TrainConfig
from evl.training import Trainer, cosine_schedule, deepspeed_config, fit, gradient_accumulation_steps


def test_global_batch_is_kept_by_accumulation():
    cfg = TrainConfig(batch_size=256, micro_batch_size=32)
    assert gradient_accumulation_steps(cfg, 8) == 1
    assert gradient_accumulation_steps(cfg, 2) == 4
    with pytest.raises(ConfigError, match="not a multiple"):
        gradient_accumulation_steps(cfg, 3)


def test_deepspeed_config_follows_precision_and_extra_file(tmp_path):
    cfg = TrainConfig(batch_size=64, micro_batch_size=8, zero_stage=2, grad_clip=1.0)
    gpu = deepspeed_config(cfg, 4, torch.device("cuda"))
    assert gpu["bf16"]["enabled"] and not gpu["fp16"]["enabled"]
    assert gpu["gradient_accumulation_steps"] == 2 and gpu["zero_optimization"]["stage"] == 2
    assert gpu["gradient_clipping"] == 1.0
    cpu = deepspeed_config(cfg, 4, torch.device("cpu"))
    assert not cpu["bf16"]["enabled"] and not cpu["fp16"]["enabled"]
    extra = tmp_path / "ds.json"
    extra.write_text(json.dumps({"zero_optimization": {"overlap_comm": True}, "fp16": {"enabled": True}}))
    cfg.deepspeed_config = str(extra)
    merged = deepspeed_config(cfg, 4, torch.device("cpu"))
    assert merged["zero_optimization"] == {"stage": 2, "overlap_comm": True} and merged["fp16"]["enabled"]


def test_cosine_schedule_per_step():
    f = cosine_schedule(TrainConfig(num_steps=100))
    assert f(0) == 1.0 and math.isclose(f(50), 0.5) and f(100) == 0.0
    w = cosine_schedule(TrainConfig(num_steps=100, warmup_steps=10))
    assert math.isclose(w(0), 0.1) and math.isclose(w(9), 1.0) and math.isclose(w(10), 1.0)


@pytest.fixture(scope="module")
def config():
    return Config(
        model=ModelConfig(backbone="EVL-Tiny", pretrained=None, num_frames=4, num_classes=4, decoder_num_layers=2,
                          cls_dropout=0.0, decoder_mlp_dropout=0.0),
        train=TrainConfig(batch_size=8, micro_batch_size=4, num_steps=12, lr=2e-3, log_every=4, eval_every=6,
                          checkpoint_every=6))


def batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    clips = torch.randint(0, 256, (4, 4, 3, 32, 32), dtype=torch.uint8, generator=g)
    return lambda epoch: ({"clip": clips, "label": torch.arange(4)} for _ in range(n))


def test_fit_learns_accumulates_and_checkpoints(config, tmp_path):
    trainer = Trainer(config)
    assert trainer.world_size == 1 and trainer.engine.gradient_accumulation_steps() == 2
    assert len(trainer.heads) == 1 and trainer.heads[0].tag == "state" and trainer.cfg is config
    backbone = {k: v.clone() for k, v in trainer.model.backbone.state_dict().items()}
    logs, checkpoints, evals = [], [], []

    def evaluate():
        [views] = trainer.gather_views(trainer.evaluate(
            [{"clip": b["clip"], "label": b["label"], "video": torch.arange(4)} for b in batches(1)(0)]))
        evals.append(views.result().top1)
        return [views.result().metrics()]

    def on_checkpoint(step, metrics):
        assert len(metrics) == 1 and "loss" in metrics[0] and "val_top1" in metrics[0]
        trainer.save(tmp_path / f"step{step}", extra={"step": step})
        checkpoints.append(step)

    [metrics] = fit(trainer, batches(), evaluate=evaluate, on_log=lambda s, m: logs.append((s, m)),
                    on_checkpoint=on_checkpoint)
    assert trainer.step == 12  # 24 micro-batches over epochs of 3, two per optimizer step
    assert checkpoints == [6, 12]
    assert all(len(m) == 1 for _, m in logs)  # one dict per head
    train_logs = [(s, m[0]) for s, m in logs if "loss" in m[0]]
    assert [s for s, _ in train_logs] == [4, 8, 12]
    assert all("val_top1" not in m for _, m in train_logs)  # each metric logged only when measured
    assert train_logs[-1][1]["loss"] < train_logs[0][1]["loss"]
    assert train_logs[-1][1]["lr"] == 0.0  # cosine reaches zero at the last step
    assert evals[-1] == 1.0 and metrics["val_top1"] == 1.0  # four clips, memorised
    for k, v in trainer.model.backbone.state_dict().items():
        assert torch.equal(v, backbone[k]), k

    # A fresh worker restored from the step-6 checkpoint has that step's weights, step count and schedule.
    assert (tmp_path / "step6" / "state").is_dir() and (tmp_path / "step6" / "latest").read_text() == "state"
    restored = Trainer(config)
    assert restored.load(tmp_path / "step6") == {"step": 6}
    assert restored.step == 6
    assert math.isclose(restored.scheduler.get_last_lr()[0], 2e-3 * cosine_schedule(config.train)(6))


def test_empty_data_fails_clearly(config):
    trainer = Trainer(config)
    with pytest.raises(RuntimeError, match="yielded no batches"):
        fit(trainer, lambda epoch: iter(()))


def test_a_cpu_trainer_compiles_no_deepspeed_op(config, tmp_path, monkeypatch):
    """DeepSpeed's CPU shared-memory op (inference only) is not JIT-built: a fresh machine's first engine would
    otherwise compile C++ for a minute. (The engine in use is checked: when this test builds the process's
    first one, the empty extensions folder shows that nothing was compiled either.)"""
    from deepspeed.comm import comm

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch_extensions"))
    Trainer(config)
    assert comm.cdb is not None and comm.cdb.shm_comm_op is None
    assert not (tmp_path / "torch_extensions").exists()
