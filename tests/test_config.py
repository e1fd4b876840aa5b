from pathlib import Path

import pytest

from evl.config import Config, ConfigError, DataConfig, TrainConfig, load_config
from evl.model import EVLClassifier

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# (file, backbone, frames, stride, temporal views, spatial views) as the reference runs them.
REFERENCE_SETTINGS = [
    ("vit_b16_8f", "ViT-B-16", 8, 16, 3, 1),
    ("vit_b16_16f", "ViT-B-16", 16, 16, 1, 3),
    ("vit_b16_32f", "ViT-B-16", 32, 8, 1, 3),
    ("vit_l14_8f", "ViT-L-14", 8, 16, 3, 1),
    ("vit_l14_16f", "ViT-L-14", 16, 16, 1, 3),
    ("vit_l14_32f", "ViT-L-14", 32, 8, 1, 3),
    ("vit_l14_336_32f", "ViT-L-14-336", 32, 8, 1, 3),
]


@pytest.mark.parametrize("name,backbone,frames,stride,tviews,sviews", REFERENCE_SETTINGS)
def test_reference_configs(name, backbone, frames, stride, tviews, sviews):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    m, d, t = cfg.model, cfg.data, cfg.train
    assert (m.backbone, m.pretrained, m.num_frames, m.num_classes, m.decoder_num_layers) == \
        (backbone, "openai", frames, 400, 4)
    assert (d.sampling_rate, d.num_temporal_views, d.num_spatial_views) == (stride, tviews, sviews)
    assert (t.lr, t.weight_decay, t.batch_size, t.num_steps, t.warmup_steps) == (4e-4, 0.05, 256, 50_000, 0)
    assert t.batch_size % (t.micro_batch_size * cfg.scaling.num_workers) == 0


def test_defaults_are_the_reference_decoder():
    m = Config().model
    assert (m.decoder_num_layers, m.decoder_mlp_factor, m.cls_dropout, m.decoder_mlp_dropout) == (4, 4.0, 0.5, 0.5)
    resolved = EVLClassifier(m.__class__(pretrained=None)).config
    assert (resolved.decoder_qkv_dim, resolved.decoder_num_heads) == (768, 12)


def test_overrides_are_typed(tmp_path):
    cfg = load_config(CONFIGS / "vit_b16_8f.yaml",
                      ["model.num_frames=16", "train.lr=1e-3", "model.temporal_conv=false",
                       "model.pretrained=null", "scaling.resources_per_worker={trainer_node: 1}"])
    assert cfg.model.num_frames == 16 and cfg.train.lr == 1e-3 and cfg.model.temporal_conv is False
    assert cfg.model.pretrained is None and cfg.scaling.resources_per_worker == {"trainer_node": 1.0}
    assert cfg.flat()["model.num_frames"] == 16


@pytest.mark.parametrize("overrides,message", [
    (["model.num_frame=16"], "unknown key model.num_frame"),
    (["modle.num_frames=16"], "unknown key modle"),
    (["model.num_frames=-8"], "model.num_frames must be positive"),
    (["model.num_frames=eight"], "model.num_frames must be an integer"),
    (["model.temporal_conv=maybe"], "model.temporal_conv must be true or false"),
    (["data.num_spatial_views=2"], "num_spatial_views must be 1 or 3"),
    (["train.zero_stage=3"], "zero_stage must be 0, 1 or 2"),
    (["train.precision=int4"], "train.precision must be one of"),
    (["nokey"], "must look like section.key=value"),
])
def test_bad_values_fail_with_the_key_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "vit_b16_8f.yaml", overrides)


def test_bad_files_fail_clearly(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listed)


@pytest.mark.parametrize("changes,message", [
    (dict(lr=0.0), r"^train\.lr must be positive, got 0\.0$"),
    (dict(lr=-1e-4), r"^train\.lr must be positive, got -0\.0001$"),
    (dict(num_steps=0), r"^train\.num_steps must be positive, got 0$"),
    (dict(num_steps=-5), r"^train\.num_steps must be positive, got -5$"),
    (dict(num_steps=100, warmup_steps=100), r"^train\.warmup_steps must be in \[0, num_steps\), got 100$"),
    (dict(num_steps=100, warmup_steps=250), r"^train\.warmup_steps must be in \[0, num_steps\), got 250$"),
    (dict(warmup_steps=-1), r"^train\.warmup_steps must be in \[0, num_steps\), got -1$"),
    (dict(precision="bf32"), r"^train\.precision must be one of auto, fp32, bf16, fp16, got 'bf32'$"),
], ids=["lr-zero", "lr-negative", "steps-zero", "steps-negative", "warmup-all", "warmup-past", "warmup-negative",
        "precision"])
def test_train_guards_refuse_naming_the_key(changes, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**changes).validate()


@pytest.mark.parametrize("changes", [
    dict(precision="auto"), dict(precision="fp32"), dict(precision="bf16"), dict(precision="fp16"),
    dict(lr=1e-9), dict(num_steps=1), dict(num_steps=100, warmup_steps=99), dict(num_steps=100, warmup_steps=0),
], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_train_accepts_the_edges(changes):
    TrainConfig(**changes).validate()


@pytest.mark.parametrize("changes,message", [
    (dict(sampling_rate=0), r"^data\.sampling_rate must be non-zero"),
    (dict(min_scale=0.6, max_scale=0.5), r"^data\.min_scale/max_scale must satisfy 0 < min <= max <= 1, got 0\.6, "
                                         r"0\.5$"),
    (dict(min_scale=0.0), r"^data\.min_scale/max_scale"),
    (dict(max_scale=1.5), r"^data\.min_scale/max_scale"),
], ids=["sampling-rate-zero", "min-above-max", "min-zero", "max-above-one"])
def test_data_guards_refuse_naming_the_key(changes, message):
    with pytest.raises(ConfigError, match=message):
        DataConfig(**changes).validate()


@pytest.mark.parametrize("changes", [
    dict(sampling_rate=1), dict(sampling_rate=-1), dict(sampling_rate=16),
    dict(min_scale=0.5, max_scale=0.5), dict(min_scale=1.0, max_scale=1.0),
], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_data_accepts_the_edges(changes):
    DataConfig(**changes).validate()


def test_guards_hold_through_a_config_file_and_overrides():
    """The same guards refuse a run started from a YAML file with command-line overrides."""
    base = CONFIGS / "vit_b16_8f.yaml"
    load_config(base, ["train.precision=bf16", "data.sampling_rate=1", "data.min_scale=1.0"])
    for override, key in [("train.lr=0", "train.lr"), ("train.warmup_steps=50000", "train.warmup_steps"),
                          ("data.sampling_rate=0", "data.sampling_rate")]:
        with pytest.raises(ConfigError, match=rf"^{key.replace('.', '[.]')} "):
            load_config(base, [override])
