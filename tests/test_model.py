import dataclasses

import pytest
import torch

from evl.config import ConfigError, ModelConfig
from evl.model import EVL, EVLClassifier, build_model


def trainable(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@pytest.mark.parametrize("frames,count", [(8, 33_183_376), (32, 33_257_104)])
def test_vit_b16_trainable_parameters_match_reference(frames, count):
    # The trainable part is built from the real open_clip config without building the ViT.
    cfg = ModelConfig(backbone="ViT-B-16", pretrained=None, num_frames=frames, num_classes=400)
    assert trainable(EVLClassifier(cfg)) == count


def test_vit_l14_trainable_parameters_match_reference():
    cfg = ModelConfig(backbone="ViT-L-14", pretrained=None, num_frames=8, num_classes=400)
    assert trainable(EVLClassifier(cfg)) == 58_727_824


def test_vit_l14_336_cross_attention_tables_follow_the_patch_grid():
    classifier = EVLClassifier(ModelConfig(backbone="ViT-L-14-336", pretrained=None, num_frames=32))
    table = classifier.decoder.temporal[0].cross_attention.w_prev
    assert tuple(table.shape) == ((2 * 24 - 1) ** 2, 1024)  # 336 / 14 = 24 patches a side


@pytest.mark.parametrize("frames", [1, 3, 8])
def test_output_shape_for_several_frame_counts(tiny_model_config, frames):
    model = build_model(dataclasses.replace(tiny_model_config, num_frames=frames)).eval()
    clips = torch.randint(0, 256, (2, frames, 3, 32, 32), dtype=torch.uint8)
    assert model(clips).shape == (2, 5)


def test_input_size_follows_the_backbone():
    model = build_model(ModelConfig(backbone="EVL-Demo", pretrained=None, num_frames=2, num_classes=3,
                                    decoder_num_layers=1)).eval()
    assert model.image_size == 64
    assert model(torch.randint(0, 256, (1, 2, 3, 64, 64), dtype=torch.uint8)).shape == (1, 3)
    with pytest.raises(ValueError, match="64x64"):
        model(torch.randint(0, 256, (1, 2, 3, 32, 32), dtype=torch.uint8))


def test_uint8_and_normalised_float_clips_agree(tiny_model_config):
    from evl.video.transforms import normalize

    model = build_model(tiny_model_config).eval()
    clips = torch.randint(0, 256, (2, 4, 3, 32, 32), dtype=torch.uint8)
    torch.testing.assert_close(model(clips), model(normalize(clips)))


def test_wrong_frame_count_is_refused(tiny_model_config):
    model = build_model(tiny_model_config).eval()
    with pytest.raises(ValueError, match="4 frames"):
        model(torch.zeros(1, 6, 3, 32, 32, dtype=torch.uint8))


def test_random_backbone_is_reproducible_from_its_seed(tiny_model_config):
    a, b = EVL(tiny_model_config), EVL(tiny_model_config)
    c = EVL(dataclasses.replace(tiny_model_config, backbone_seed=1))
    wa, wb, wc = (m.backbone.visual.conv1.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert a.backbone.weights_id == b.backbone.weights_id != c.backbone.weights_id


def test_only_decoder_and_head_learn(tiny_model_config):
    model = build_model(tiny_model_config).train()
    assert not model.backbone.training  # stays in eval mode whatever the parent does
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    classifier_before = {k: v.clone() for k, v in model.classifier.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == model.trainable_parameters()

    clips = torch.randint(0, 256, (2, 4, 3, 32, 32), dtype=torch.uint8)
    loss = torch.nn.functional.cross_entropy(model(clips), torch.tensor([0, 3]))
    loss.backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.classifier.parameters())
    optimizer.step()

    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, backbone_before[k]), k
    changed = [k for k, v in model.classifier.state_dict().items() if not torch.equal(v, classifier_before[k])]
    assert "decoder.query_token" in changed and "head.fc.weight" in changed


def test_cross_attention_off_changes_nothing_at_zero_init(tiny_model_config):
    torch.manual_seed(0)
    with_ca = build_model(tiny_model_config).eval()
    without = build_model(dataclasses.replace(tiny_model_config, temporal_cross_attention=False)).eval()
    state = {k: v for k, v in with_ca.classifier.state_dict().items() if "cross_attention" not in k}
    without.classifier.load_state_dict(state)  # same decoder weights, minus the zero tables
    clips = torch.randint(0, 256, (2, 4, 3, 32, 32), dtype=torch.uint8)
    torch.testing.assert_close(with_ca(clips), without(clips))
    # ...and the tables do act once they are non-zero.
    with torch.no_grad():
        for temporal in with_ca.classifier.decoder.temporal:
            temporal.cross_attention.w_prev.normal_()
    assert not torch.allclose(with_ca(clips), without(clips))


def test_temporal_modules_can_each_be_switched_off(tiny_model_config):
    cfg = dataclasses.replace(tiny_model_config, temporal_conv=False, temporal_pos_embed=False,
                              temporal_cross_attention=False)
    model = build_model(cfg).eval()
    keys = model.classifier.state_dict().keys()
    assert not any(".conv." in k or "pos_embed" in k or "cross_attention" in k for k in keys)
    assert model(torch.zeros(1, 4, 3, 32, 32, dtype=torch.uint8)).shape == (1, 5)


def test_frame_order_matters_only_through_temporal_modules(tiny_model_config):
    """Without temporal modules the decoder sees a set of frame tokens: reversing the clip changes nothing.
    With a temporal position embedding it does - that is what lets EVL tell motion directions apart."""
    clips = torch.randint(0, 256, (2, 4, 3, 32, 32), dtype=torch.uint8)
    reverse = clips.flip(1)
    plain = build_model(dataclasses.replace(tiny_model_config, temporal_conv=False, temporal_pos_embed=False,
                                            temporal_cross_attention=False)).eval()
    torch.testing.assert_close(plain(clips), plain(reverse))
    temporal = build_model(tiny_model_config).eval()
    with torch.no_grad():
        for t in temporal.classifier.decoder.temporal:
            t.pos_embed.normal_()
    assert not torch.allclose(temporal(clips), temporal(reverse))


def test_initialisation_follows_the_reference(tiny_model_config):
    classifier = EVLClassifier(tiny_model_config)
    d = classifier.decoder
    assert torch.count_nonzero(d.query_token) == 0
    for temporal in d.temporal:
        assert torch.count_nonzero(temporal.pos_embed) == 0
        assert torch.count_nonzero(temporal.cross_attention.w_prev) == 0
        assert torch.count_nonzero(temporal.cross_attention.w_next) == 0
        assert torch.count_nonzero(temporal.conv.weight) > 0  # PyTorch default init, not zero
    layer = d.layers[0]
    for proj in (layer.attn.q_proj, layer.attn.k_proj, layer.attn.v_proj, layer.attn.out_proj):
        assert torch.count_nonzero(proj.bias) == 0
    bias = layer.mlp.fc1.bias
    assert 0 < bias.abs().max() < 1e-4  # N(0, 1e-6)


@pytest.mark.parametrize("change,message", [
    (dict(num_frames=-1), "num_frames must be positive"),
    (dict(decoder_num_layers=4), "exceeds the depth"),
    (dict(backbone="ViT-Q-99"), "unknown backbone 'ViT-Q-99'"),
    (dict(backbone="RN50"), "not an open_clip VisionTransformer"),
    (dict(cls_dropout=1.5), "cls_dropout"),
    (dict(decoder_qkv_dim=60, decoder_num_heads=8), "not divisible"),
])
def test_bad_model_configs_fail_clearly(tiny_model_config, change, message):
    with pytest.raises(ConfigError, match=message):
        build_model(dataclasses.replace(tiny_model_config, **change))
