import open_clip
import pytest
import torch

from evl.backbone import FrozenCLIPBackbone, backbone_spec
from evl.config import ConfigError


def test_spec_reads_real_configs_without_building_them():
    b16, l14, l14_336 = (backbone_spec(n) for n in ("ViT-B-16", "ViT-L-14", "ViT-L-14-336"))
    assert (b16.width, b16.layers, b16.heads, b16.grid, b16.num_tokens) == (768, 12, 12, (14, 14), 197)
    assert (l14.width, l14.heads, l14.grid) == (1024, 16, (16, 16))
    assert (l14_336.image_size, l14_336.grid) == (336, (24, 24))


def test_last_blocks_match_open_clip_and_expose_queries_and_keys():
    backbone = FrozenCLIPBackbone("EVL-Tiny", None, num_feature_layers=2)
    images = torch.randn(3, 3, 32, 32)
    features = backbone(images)
    assert len(features) == 2

    visual = backbone.visual
    x = visual._embeds(images)
    outputs = []
    for block in visual.transformer.resblocks:
        qkv = torch.nn.functional.linear(block.ln_1(x), block.attn.in_proj_weight, block.attn.in_proj_bias)
        x = block(x)  # open_clip's own block (nn.MultiheadAttention)
        outputs.append((x, qkv))
    for f, (tokens, qkv) in zip(features, outputs[-2:]):
        assert f.tokens.shape == (3, 17, 64) and f.q.shape == (3, 17, 4, 16)
        torch.testing.assert_close(f.tokens, tokens, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(f.q.flatten(2), qkv[..., :64])
        torch.testing.assert_close(f.k.flatten(2), qkv[..., 64:128])


def test_backbone_is_frozen():
    backbone = FrozenCLIPBackbone("EVL-Tiny", None, num_feature_layers=1)
    backbone.train()
    assert not backbone.training
    assert not any(p.requires_grad for p in backbone.parameters())
    assert not backbone(torch.randn(1, 3, 32, 32))[0].tokens.requires_grad


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_local_weights_file_loads_into_backbone(tmp_path, suffix):
    source = open_clip.create_model("EVL-Tiny", pretrained=None)
    with torch.no_grad():
        source.visual.conv1.weight.fill_(0.125)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pt":
        torch.save(source.state_dict(), path)
    else:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))

    backbone = FrozenCLIPBackbone("EVL-Tiny", str(path), num_feature_layers=1)
    for key, value in source.visual.state_dict().items():
        if key.startswith(("ln_post", "proj")):
            continue  # unused by EVL and dropped
        assert torch.equal(backbone.visual.state_dict()[key], value), key
    assert backbone.weights_id.startswith("EVL-Tiny:sha256:")


def test_weights_for_another_model_are_refused(tmp_path):
    path = tmp_path / "other.pt"
    torch.save(open_clip.create_model("EVL-Demo", pretrained=None).state_dict(), path)
    with pytest.raises(ConfigError, match="could not load backbone weights"):
        FrozenCLIPBackbone("EVL-Tiny", str(path), num_feature_layers=1)


def test_missing_file_and_unknown_tag_fail_clearly(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        FrozenCLIPBackbone("EVL-Tiny", str(tmp_path / "nope.pt"), num_feature_layers=1)
    with pytest.raises(ConfigError, match="neither a local weights file nor an open_clip tag"):
        FrozenCLIPBackbone("ViT-B-16", "not-a-tag", num_feature_layers=1)


def test_openai_tag_is_known_for_reference_backbones():
    for name in ("ViT-B-16", "ViT-L-14", "ViT-L-14-336"):
        assert "openai" in open_clip.list_pretrained_tags_by_model(name)
        assert open_clip.get_pretrained_cfg(name, "openai").get("quick_gelu")  # hence force_quick_gelu
