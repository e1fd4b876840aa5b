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


# --------------------------------------------------------------------------------------------------------------
# The activation is part of the backbone: every way of naming the same weights gives the same model.


def _tiny_weights_file(tmp_path, seed: int = 1) -> str:
    torch.manual_seed(seed)
    path = tmp_path / "tiny_clip.pt"
    torch.save(open_clip.create_model("EVL-Tiny", pretrained=None).state_dict(), path)
    return str(path)


def _explicit_quickgelu_tokens(path: str, images: torch.Tensor) -> torch.Tensor:
    """The last block's output of open_clip's EVL-Tiny with QuickGELU forced, written out with open_clip alone."""
    visual = open_clip.create_model("EVL-Tiny", pretrained=path, force_quick_gelu=True).visual.eval()
    assert isinstance(visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    with torch.no_grad():
        x = visual._embeds(images)
        for block in visual.transformer.resblocks:
            x = block(x)
    return x


def test_every_route_to_quickgelu_weights_gives_the_same_model(tmp_path):
    from evl.backbone import resolve_activation

    path = _tiny_weights_file(tmp_path)
    images = torch.randn(2, 3, 32, 32)
    expected = _explicit_quickgelu_tokens(path, images)
    hub_dir = tmp_path / "hub"
    hub_dir.mkdir()
    (hub_dir / "open_clip_model.pt").write_bytes(open(path, "rb").read())
    (hub_dir / "open_clip_config.json").write_text('{"model_cfg": {"quick_gelu": true}, "preprocess_cfg": {}}')
    routes = {
        "-quickgelu name + file": FrozenCLIPBackbone("EVL-Tiny-quickgelu", path, 1),
        "quick_gelu=True + file": FrozenCLIPBackbone("EVL-Tiny", path, 1, quick_gelu=True),
        "hub file with its config": FrozenCLIPBackbone("EVL-Tiny", str(hub_dir / "open_clip_model.pt"), 1),
    }
    for route, backbone in routes.items():
        assert backbone.quick_gelu and backbone.spec.name == "EVL-Tiny", route
        torch.testing.assert_close(backbone(images)[-1].tokens, expected, atol=1e-6, rtol=1e-6, msg=route)
    assert routes["-quickgelu name + file"].weights_id == routes["quick_gelu=True + file"].weights_id

    plain = FrozenCLIPBackbone("EVL-Tiny", path, 1)  # a bare file cannot say: GELU, with a warning
    assert not plain.quick_gelu
    assert (plain(images)[-1].tokens - expected).abs().max() > 1e-3  # GELU really gives other features
    # The tag's own record decides for open_clip tags (no download needed to resolve it).
    assert resolve_activation("ViT-B-16", "openai") == ("ViT-B-16", True)
    assert resolve_activation("ViT-B-16-quickgelu", None) == ("ViT-B-16", True)
    assert resolve_activation("ViT-L-14-336", None) == ("ViT-L-14-336", False)


def test_bare_weights_file_warns_and_contradictions_are_refused(tmp_path, caplog):
    from evl.backbone import resolve_activation

    path = _tiny_weights_file(tmp_path)
    with caplog.at_level("WARNING", logger="evl.backbone"):
        assert resolve_activation("EVL-Tiny", path) == ("EVL-Tiny", False)
    assert "does not say which activation" in caplog.text and "model.quick_gelu: true" in caplog.text
    with pytest.raises(ConfigError, match="model.quick_gelu=false says GELU but the open_clip tag 'openai' says "
                                          "QuickGELU"):
        resolve_activation("ViT-B-16", "openai", quick_gelu=False)
    with pytest.raises(ConfigError, match="EVL-Tiny-quickgelu"):
        resolve_activation("EVL-Tiny-quickgelu", path, quick_gelu=False)


def test_weights_in_a_store_are_fetched_once_and_named_by_their_content(tmp_path, s3, monkeypatch):
    """`model.pretrained=s3://...`: the hub layout kept in a bucket gives the model the local files give (its
    config beside the weights says QuickGELU), under the same sha256 identity, downloaded once per machine."""
    from evl import storage

    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    path = _tiny_weights_file(tmp_path)
    hub_dir = tmp_path / "hub"
    hub_dir.mkdir()
    (hub_dir / "open_clip_model.pt").write_bytes(open(path, "rb").read())
    (hub_dir / "open_clip_config.json").write_text('{"model_cfg": {"quick_gelu": true}, "preprocess_cfg": {}}')
    uri = f"{s3.bucket}/weights/tiny/open_clip_model.pt"
    storage.upload_file(str(hub_dir / "open_clip_model.pt"), uri)
    storage.upload_file(str(hub_dir / "open_clip_config.json"), f"{s3.bucket}/weights/tiny/open_clip_config.json")

    local = FrozenCLIPBackbone("EVL-Tiny", str(hub_dir / "open_clip_model.pt"), 1)
    remote = FrozenCLIPBackbone("EVL-Tiny", uri, 1)
    assert remote.quick_gelu and remote.weights_id == local.weights_id
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(remote(images)[-1].tokens, local(images)[-1].tokens, atol=0, rtol=0)
    names = ("open_clip_model.pt", "open_clip_config.json")

    def cached() -> dict[str, int]:  # a download replaces the file: another inode
        return {p.name: p.stat().st_ino for p in (tmp_path / "cache").rglob("*") if p.name in names}

    first = cached()
    assert set(first) == set(names)
    FrozenCLIPBackbone("EVL-Tiny", uri, 1)  # a second model on this machine: the same files, not downloaded again
    assert cached() == first
    with pytest.raises(ConfigError, match="does not exist"):
        FrozenCLIPBackbone("EVL-Tiny", f"{s3.bucket}/weights/missing.pt", 1)
