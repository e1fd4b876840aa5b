import dataclasses

import pytest
import torch

from evl.checkpoint import Checkpoint, CheckpointError, load_checkpoint, load_into, save_checkpoint
from evl.config import ModelConfig
from evl.model import EVLClassifier, build_model


def reference_layout_state_dict(width=768, frames=8, classes=400, layers=4, rows=729, seed=0):
    """A state dict with the key names and shapes of the reference's released ViT-B/16 checkpoints, written from
    the list in the reference facts (not from this project's model), filled with random numbers."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    sd = {"module.decoder.cls_token": r(width)}
    for i in range(layers):
        p = f"module.decoder.decoder_layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd[p + f"attn.{name}.weight"], sd[p + f"attn.{name}.bias"] = r(width, width), r(width)
        sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = r(4 * width, width), r(4 * width)
        sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = r(width, 4 * width), r(width)
        for n in (1, 2, 3):
            sd[p + f"norm{n}.weight"], sd[p + f"norm{n}.bias"] = r(width), r(width)
        sd[f"module.decoder.temporal_conv.{i}.weight"] = r(width, 1, 3)
        sd[f"module.decoder.temporal_conv.{i}.bias"] = r(width)
        sd[f"module.decoder.temporal_pos_embed.{i}"] = r(frames, width)
        sd[f"module.decoder.cross_attention.{i}.w1"] = r(rows, width)
        sd[f"module.decoder.cross_attention.{i}.w2"] = r(rows, width)
    sd["module.proj.0.weight"], sd["module.proj.0.bias"] = r(width), r(width)
    sd["module.proj.2.weight"], sd["module.proj.2.bias"] = r(classes, width), r(classes)
    return sd


def test_reference_checkpoint_loads_with_no_missing_or_unexpected_keys(tmp_path):
    sd = reference_layout_state_dict()
    path = tmp_path / "k400_vitb16_8f.pth"
    torch.save({"model": sd, "optimizer": {}, "next_step": 50000}, path)

    ckpt = load_checkpoint(path)
    assert (ckpt.model.backbone, ckpt.model.num_frames, ckpt.model.num_classes) == ("ViT-B-16", 8, 400)
    classifier = EVLClassifier(dataclasses.replace(ckpt.model, pretrained=None))
    load_into(classifier, ckpt, backbone_weights=None)  # strict: raises on any missing/unexpected key

    state = classifier.state_dict()
    assert torch.equal(state["decoder.query_token"], sd["module.decoder.cls_token"])
    assert torch.equal(state["decoder.temporal.2.cross_attention.w_prev"], sd["module.decoder.cross_attention.2.w1"])
    assert torch.equal(state["decoder.temporal.2.cross_attention.w_next"], sd["module.decoder.cross_attention.2.w2"])
    assert torch.equal(state["head.fc.weight"], sd["module.proj.2.weight"])
    assert len(state) == len(sd)


def test_reference_checkpoint_for_other_frames_is_refused(tmp_path):
    path = tmp_path / "ref16.pth"
    torch.save({"model": reference_layout_state_dict(frames=16)}, path)
    classifier = EVLClassifier(ModelConfig(backbone="ViT-B-16", pretrained=None, num_frames=8))
    with pytest.raises(CheckpointError, match="num_frames: checkpoint has 16, model has 8"):
        load_into(classifier, load_checkpoint(path), backbone_weights=None)


def test_project_checkpoint_round_trips(tmp_path, tiny_model_config):
    model = build_model(tiny_model_config).eval()
    with torch.no_grad():
        for p in model.classifier.parameters():
            p.normal_()
    path = tmp_path / "decoder.pt"
    save_checkpoint(path, model.classifier, model.config, model.backbone.weights_id, class_names=list("abcde"),
                    extra={"step": 7})
    saved = torch.load(path, weights_only=True)
    assert not any(k.startswith("backbone") or "visual" in k for k in saved["state_dict"])  # decoder + head only

    ckpt = load_checkpoint(path)
    assert ckpt.class_names == list("abcde") and ckpt.extra == {"step": 7}
    fresh = build_model(tiny_model_config).eval()
    load_into(fresh.classifier, ckpt, fresh.backbone.weights_id)
    clips = torch.randint(0, 256, (2, 4, 3, 32, 32), dtype=torch.uint8)
    torch.testing.assert_close(fresh(clips), model(clips))


@pytest.mark.parametrize("change,named", [
    (dict(num_frames=8), "num_frames"),
    (dict(num_classes=7), "num_classes"),
    (dict(backbone="EVL-Demo"), "backbone"),
    (dict(backbone_seed=3), "backbone weights"),
])
def test_project_checkpoint_refuses_another_configuration(tmp_path, tiny_model_config, change, named):
    model = build_model(tiny_model_config)
    path = tmp_path / "decoder.pt"
    save_checkpoint(path, model.classifier, model.config, model.backbone.weights_id)
    other = build_model(dataclasses.replace(tiny_model_config, **change))
    with pytest.raises(CheckpointError, match=named):
        load_into(other.classifier, load_checkpoint(path), other.backbone.weights_id)


def test_garbage_files_fail_clearly(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="is not a checkpoint this project can read") as err:
        load_checkpoint(text)
    message = str(err.value)  # one line naming the file, never torch's advice to unpickle arbitrary code
    assert message.startswith(str(text)) and "\n" not in message and "weights_only" not in message
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=f"checkpoint {tmp_path / 'decoder.pt'} does not exist"):
        load_checkpoint(tmp_path)  # a folder: its decoder.pt
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(1)}, other)
    with pytest.raises(CheckpointError, match="neither an EVL checkpoint nor a reference checkpoint"):
        load_checkpoint(other)


def _strip(sd: dict, *parts: str) -> dict:
    return {k: v for k, v in sd.items() if not any(part in k for part in parts)}


def test_reference_checkpoint_backbone_is_quickgelu_openai_clip(tmp_path):
    path = tmp_path / "ref.pth"
    torch.save({"model": reference_layout_state_dict()}, path)
    ckpt = load_checkpoint(path)
    assert ckpt.model.quick_gelu is True and ckpt.model.pretrained == "openai"
    # The README's way of naming OpenAI weights in a local file fits it, as does the plain name with a file.
    for backbone in ("ViT-B-16-quickgelu", "ViT-B-16"):
        classifier = EVLClassifier(ModelConfig(backbone=backbone, pretrained=None, quick_gelu=True))
        load_into(classifier, ckpt, backbone_weights=None)
    gelu = EVLClassifier(ModelConfig(backbone="ViT-B-16", pretrained=None, quick_gelu=False))
    with pytest.raises(CheckpointError, match="quick_gelu: checkpoint has True, model has False"):
        load_into(gelu, ckpt, backbone_weights=None)
    with pytest.raises(CheckpointError, match="OpenAI CLIP, trained with QuickGELU"):
        load_checkpoint(path, given={"quick_gelu": False})


def test_reference_checkpoint_without_position_embedding_takes_the_stated_frame_count(tmp_path):
    path = tmp_path / "no_pos.pth"
    torch.save({"model": _strip(reference_layout_state_dict(), "temporal_pos_embed")}, path)
    with pytest.raises(CheckpointError, match="--set model.num_frames=8"):
        load_checkpoint(path)
    ckpt = load_checkpoint(path, given={"num_frames": 16})
    assert ckpt.model.num_frames == 16 and ckpt.model.temporal_pos_embed is False
    load_into(EVLClassifier(dataclasses.replace(ckpt.model, pretrained=None)), ckpt, backbone_weights=None)
    with_pos = tmp_path / "with_pos.pth"
    torch.save({"model": reference_layout_state_dict()}, with_pos)
    with pytest.raises(CheckpointError, match="trained with 8 frames, not 16"):
        load_checkpoint(with_pos, given={"num_frames": 16})


def test_reference_backbone_is_named_when_the_shapes_cannot_tell(tmp_path):
    l14_336 = reference_layout_state_dict(width=1024, rows=2209, layers=1, classes=4)
    path = tmp_path / "l14_336.pth"
    torch.save({"model": l14_336}, path)
    assert load_checkpoint(path).model.backbone == "ViT-L-14-336"  # the cross-attention table tells

    no_table = tmp_path / "l14_no_xattn.pth"
    torch.save({"model": _strip(l14_336, "cross_attention")}, no_table)
    with pytest.raises(CheckpointError, match="could be any of ViT-L-14, ViT-L-14-336.*model.backbone"):
        load_checkpoint(no_table)
    ckpt = load_checkpoint(no_table, given={"backbone": "ViT-L-14-336"})
    assert ckpt.model.backbone == "ViT-L-14-336" and not ckpt.model.temporal_cross_attention
    with pytest.raises(CheckpointError, match="was not trained on ViT-B-16"):
        load_checkpoint(no_table, given={"backbone": "ViT-B-16"})
    with pytest.raises(CheckpointError, match="was not trained on ViT-L-14"):
        load_checkpoint(path, given={"backbone": "ViT-L-14"})  # 2209 rows is a 24 x 24 grid, not 16 x 16
    with pytest.raises(CheckpointError, match="decoder_num_layers: checkpoint has 1, given 4"):
        load_checkpoint(path, given={"decoder_num_layers": 4})


def test_project_checkpoint_records_the_activation(tmp_path, tiny_model_config):
    quick = dataclasses.replace(tiny_model_config, backbone="EVL-Tiny-quickgelu")
    model = build_model(quick)
    assert model.config.backbone == "EVL-Tiny" and model.config.quick_gelu is True
    path = tmp_path / "decoder.pt"
    save_checkpoint(path, model.classifier, model.config, model.backbone.weights_id)
    saved = load_checkpoint(path).model
    assert (saved.backbone, saved.quick_gelu) == ("EVL-Tiny", True)
    same = build_model(dataclasses.replace(tiny_model_config, quick_gelu=True))
    load_into(same.classifier, load_checkpoint(path), same.backbone.weights_id)
    other = build_model(tiny_model_config)
    with pytest.raises(CheckpointError, match="quick_gelu: checkpoint has True, model has False"):
        load_into(other.classifier, load_checkpoint(path), other.backbone.weights_id)


def test_load_into_refuses_missing_and_unexpected_keys_by_name(tiny_model_config):
    """A state dict of the right configuration loads only when its keys are exactly the model's."""
    source = EVLClassifier(tiny_model_config)
    state = source.state_dict()

    def checkpoint(state_dict):
        return Checkpoint(model=source.config, state_dict=state_dict, backbone_weights=None)

    target = EVLClassifier(tiny_model_config)
    load_into(target, checkpoint(dict(state)), backbone_weights=None)
    assert all(torch.equal(v, state[k]) for k, v in target.state_dict().items())
    without_bias = {k: v for k, v in state.items() if k != "head.fc.bias"}
    with pytest.raises(CheckpointError, match=r"missing \['head\.fc\.bias'\], unexpected \[\]"):
        load_into(EVLClassifier(tiny_model_config), checkpoint(without_bias), backbone_weights=None)
    stray = {**state, "decoder.stray.weight": torch.zeros(3)}
    with pytest.raises(CheckpointError, match=r"missing \[\], unexpected \['decoder\.stray\.weight'\]"):
        load_into(EVLClassifier(tiny_model_config), checkpoint(stray), backbone_weights=None)
