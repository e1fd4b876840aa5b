"""The training step without Ray: one process, DeepSpeed on the CPU with gloo."""

import dataclasses
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from evl.config import Config, ConfigError, ModelConfig, TrainConfig
from evl.model import EVLClassifier
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


def test_deepspeed_config_file_in_a_store_and_its_errors(tmp_path, s3):
    from evl import storage
    from evl.training import read_deepspeed_overrides

    uri = f"{s3.bucket}/deepspeed/zero2.json"
    storage.write_text(uri, json.dumps({"zero_optimization": {"stage": 2}}))
    assert read_deepspeed_overrides(TrainConfig(deepspeed_config=uri)) == {"zero_optimization": {"stage": 2}}
    with pytest.raises(ConfigError, match=r"^train.deepspeed_config s3://evl-test/deepspeed/nope.json: does not exist"):
        read_deepspeed_overrides(TrainConfig(deepspeed_config=f"{s3.bucket}/deepspeed/nope.json"))
    storage.write_text(f"{s3.bucket}/deepspeed/list.json", "[1]")
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        read_deepspeed_overrides(TrainConfig(deepspeed_config=f"{s3.bucket}/deepspeed/list.json"))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="bad.json: Expecting"):
        read_deepspeed_overrides(TrainConfig(deepspeed_config=str(tmp_path / "bad.json")))


def test_cosine_schedule_per_step():
    f = cosine_schedule(TrainConfig(num_steps=100))
    assert f(0) == 1.0 and math.isclose(f(50), 0.5) and f(100) == 0.0
    w = cosine_schedule(TrainConfig(num_steps=100, warmup_steps=10))
    assert math.isclose(w(0), 0.1) and math.isclose(w(9), 1.0) and math.isclose(w(10), 1.0)


def test_cosine_schedule_with_warmup_ends_at_exactly_zero():
    """The factor the optimizer step after `step` steps trains with, against the formula written out here."""
    num_steps, warmup = 110, 10
    f = cosine_schedule(TrainConfig(num_steps=num_steps, warmup_steps=warmup))

    def expected(step):
        if step < warmup:
            return (step + 1) / warmup  # the first step already trains, at lr / warmup
        t = min(step - warmup, num_steps - warmup) / (num_steps - warmup)
        return (1 + math.cos(math.pi * t)) / 2

    assert math.isclose(f(0), 0.1)
    assert f(warmup - 1) == 1.0  # the last warmup step reaches the full lr
    assert f(warmup) == 1.0
    assert math.isclose(f(warmup + 50), 0.5)  # halfway through the decay
    assert f(num_steps - 1) > 0  # the last step still trains
    assert f(num_steps) == 0.0 and f(num_steps + 7) == 0.0
    for step in (1, 4, 8, 11, 30, 60, 77, 95, 109):
        assert math.isclose(f(step), expected(step), rel_tol=1e-12), step
    decay = [f(s) for s in range(warmup, num_steps + 1)]
    assert all(a > b for a, b in zip(decay, decay[1:]))


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


# ---- dropout streams and evaluation (one trainer with dropout, shared by the module) ---------------------------


@pytest.fixture(scope="module")
def dropout_config():
    return Config(
        model=ModelConfig(backbone="EVL-Tiny", pretrained=None, num_frames=4, num_classes=4, decoder_num_layers=2,
                          cls_dropout=0.5, decoder_mlp_dropout=0.5),
        train=TrainConfig(batch_size=8, micro_batch_size=4, num_steps=100, lr=1e-3))


@pytest.fixture(scope="module")
def dropout_trainer(dropout_config):
    """Tests that train on it take whole optimizer steps (an even number of micro-batches), so a checkpoint never
    falls inside an accumulation window."""
    trainer = Trainer(dropout_config)
    yield trainer
    trainer.close()


def fixed_batch(clips=4, seed=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (clips, 4, 3, 32, 32), dtype=torch.uint8, generator=g),
            torch.randint(0, 4, (clips,), generator=g))


def train_recording_masks(trainer, clips, labels, micro_batches):
    """Train on the same batch `micro_batches` times; per micro-batch, the masks of every dropout layer (True where
    dropout zeroed an element), in forward order."""
    masks: list[torch.Tensor] = []

    def hook(module, inputs, output):
        if module.training:
            masks.append((output == 0) & (inputs[0] != 0))

    layers = [m for m in trainer.heads[0].classifier.modules() if isinstance(m, torch.nn.Dropout)]
    handles = [m.register_forward_hook(hook) for m in layers]
    out = []
    try:
        for _ in range(micro_batches):
            masks.clear()
            trainer.train_micro_batch(clips, labels)
            assert len(masks) == len(layers) == 3  # two decoder MLPs and the head
            out.append([m.clone() for m in masks])
    finally:
        for h in handles:
            h.remove()
    return out


def same_masks(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_dropout_stream_moves_on_every_step_and_a_checkpoint_keeps_its_future(dropout_trainer, tmp_path):
    """The same inputs every micro-batch, so only the head's stream can change the masks: it must move on after
    every micro-batch, and a checkpoint must hold the stream where it was, so a restored run draws the masks the
    uninterrupted run went on to draw."""
    trainer = dropout_trainer
    clips, labels = fixed_batch()
    masks = train_recording_masks(trainer, clips, labels, 4)
    for mask in masks[0]:
        assert 0.3 < mask.float().mean() < 0.7  # p = 0.5: about half dropped
    for before, after in zip(masks, masks[1:]):
        assert not same_masks(before, after)
    trainer.save(tmp_path)
    future = train_recording_masks(trainer, clips, labels, 4)
    assert not same_masks(future[0], masks[-1])
    trainer.load(tmp_path)
    assert all(same_masks(a, b) for a, b in zip(train_recording_masks(trainer, clips, labels, 4), future))


def test_train_micro_batch_counts_the_clips_its_logits_get_right(dropout_trainer):
    trainer = dropout_trainer
    seen: list[torch.Tensor] = []
    handle = trainer.heads[0].classifier.register_forward_hook(lambda m, i, out: seen.append(out.detach()))
    counted, expected = [], []
    try:
        for seed in range(4):
            clips, labels = fixed_batch(seed=seed)
            [(_, correct)] = trainer.train_micro_batch(clips, labels)
            counted.append(int(correct))
            expected.append(int((seen[-1].argmax(-1) == labels).sum()))
    finally:
        handle.remove()
    assert counted == expected and 0 < sum(expected) < 16


def test_evaluate_runs_without_dropout(dropout_trainer):
    """Evaluation scores repeat call to call and are those of the head's weights in a copy without dropout; the
    head trains with dropout again afterwards."""
    trainer = dropout_trainer
    head = trainer.heads[0]
    clips, labels = fixed_batch(clips=8, seed=5)
    batches = [{"clip": clips[i:i + 4], "label": labels[i:i + 4], "video": torch.arange(i, i + 4)} for i in (0, 4)]
    [first] = trainer.evaluate(batches)
    [second] = trainer.evaluate(batches)
    assert head.classifier.training
    plain = EVLClassifier(dataclasses.replace(head.config, cls_dropout=0.0, decoder_mlp_dropout=0.0))
    plain.load_state_dict(head.classifier.state_dict())
    with torch.no_grad():
        expected = plain(trainer.features(clips)[-head.depth:]).softmax(-1).numpy()
    assert sorted(first.scores) == list(range(8))
    for video in range(8):
        np.testing.assert_array_equal(first.scores[video], second.scores[video])
        np.testing.assert_allclose(first.scores[video], expected[video], rtol=1e-5, atol=1e-7)


def test_a_pack_checkpoint_loads_only_into_a_pack_of_as_many_heads(dropout_config, tmp_path):
    three = Trainer([dropout_config] * 3)
    three.save(tmp_path, extra={"step": 0})
    again, two, four = (Trainer([dropout_config] * n) for n in (3, 2, 4))
    try:
        assert again.load(tmp_path) == {"step": 0}
        with pytest.raises(ConfigError, match="holds a pack of 3 heads; this trainer has 2"):
            two.load(tmp_path)
        with pytest.raises(FileNotFoundError, match="no DeepSpeed checkpoint state-3 .* found: state-0, state-1, "
                                                    "state-2"):
            four.load(tmp_path)
    finally:
        for trainer in (three, again, two, four):
            trainer.close()


# ---- the loop's cadence and its metrics window ------------------------------------------------------------------


def test_fit_evaluates_and_checkpoints_at_the_last_step_off_the_cadence(config, tmp_path):
    """num_steps = 5 with evaluations and checkpoints every 3 steps: the last step (5) is evaluated, logged and
    checkpointed all the same."""
    cfg = dataclasses.replace(config, train=dataclasses.replace(config.train, batch_size=4, num_steps=5,
                                                                log_every=2, eval_every=3, checkpoint_every=3))
    trainer = Trainer(cfg)
    eval_batch = [{"clip": b["clip"], "label": b["label"], "video": torch.arange(4)} for b in batches(1)(0)]
    evaluated, logs, checkpoints = [], [], []

    def evaluate():
        evaluated.append(trainer.step)
        [views] = trainer.evaluate(eval_batch)
        return [{**views.result().metrics(), "eval_step": float(trainer.step)}]

    def on_checkpoint(step, metrics):
        trainer.save(tmp_path / f"step{step}", extra={"step": step})
        checkpoints.append((step, metrics[0]))

    [result] = fit(trainer, batches(), evaluate=evaluate, on_log=lambda s, m: logs.append((s, m[0])),
                   on_checkpoint=on_checkpoint)
    assert trainer.step == 5 and evaluated == [3, 5]
    assert [(s, m["eval_step"]) for s, m in logs if "val_top1" in m] == [(3, 3.0), (5, 5.0)]
    assert [s for s, m in logs if "loss" in m] == [2, 4, 5]
    assert [s for s, _ in checkpoints] == [3, 5] and checkpoints[-1][1] == result
    assert result["eval_step"] == 5.0 and "loss" in result
    restored = Trainer(cfg)
    assert restored.load(tmp_path / "step5") == {"step": 5} and restored.step == 5
    for t in (trainer, restored):
        t.close()


class ScriptedTrainer:
    """What fit drives, without engines: one head, an optimizer step every `accumulation` micro-batches, and a
    micro-batch whose "clip" holds the class predicted for each clip, so the correct count is known."""

    def __init__(self, accumulation: int, **train):
        self.cfgs = [Config(train=TrainConfig(**train))]
        self.heads = [SimpleNamespace(lr=1e-3)]
        self.device, self.world_size = torch.device("cpu"), 1
        self.accumulation, self.micro_batches = accumulation, 0

    @property
    def step(self) -> int:
        return self.micro_batches // self.accumulation

    def train_micro_batch(self, predicted, labels):
        self.micro_batches += 1
        return [(torch.tensor(1.0), (predicted == labels).sum())]


def test_train_top1_is_correct_clips_over_clips_across_accumulation():
    """Two optimizer steps of two micro-batches per logged window; the second window's micro-batches differ in
    size, where a mean of per-batch accuracies (0.5) would differ from clips over clips (6/14)."""
    trainer = ScriptedTrainer(accumulation=2, num_steps=4, log_every=2, eval_every=100, checkpoint_every=100)
    scripted = [(4, 4), (0, 4), (1, 4), (3, 4),  # window 1: 8 of 16
                (2, 4), (2, 4), (0, 4), (2, 2)]  # window 2: 6 of 14
    micro = [{"clip": torch.tensor([1] * right + [0] * (clips - right)), "label": torch.ones(clips, dtype=torch.long)}
             for right, clips in scripted]
    logs = []
    fit(trainer, lambda data_pass: iter(micro), on_log=lambda s, m: logs.append((s, m[0])))
    assert [(s, m["train_top1"]) for s, m in logs] == [(2, 8 / 16), (4, 6 / 14)]
    assert trainer.micro_batches == 8
