"""Clip transforms: reference crop geometry, torchvision's resize without torchvision, CLIP normalisation."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from evl.video import transforms as T
from evl.video.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    TrainTransform,
    normalize,
    resize_antialiased,
    resize_short_side,
    sample_crop_box,
    spatial_crops,
)

SPEC = "rand-m7-n4-mstd0.5-inc1"


def constant_clip(t=6, h=48, w=64, seed=0) -> np.ndarray:
    """T copies of one random frame: uint8 [T, H, W, 3]."""
    frame = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return np.repeat(frame[None], t, axis=0)


def test_crop_box_stays_inside_and_respects_scale():
    rng = np.random.default_rng(0)
    for _ in range(500):
        top, left, h, w = sample_crop_box(256, 340, rng, scale=(0.08, 1.0))
        assert 0 <= top and top + h <= 256 and 0 <= left and left + w <= 340
        assert 0.08 * 0.9 <= h * w / (256 * 340) <= 1.0
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
    # impossible aspect: falls back to the largest centred box within the ratio range
    assert sample_crop_box(10, 1000, rng, scale=(0.99, 1.0)) == (0, 493, 10, 13)


def test_train_transform_shape_dtype_and_same_crop_for_all_frames():
    transform = TrainTransform(32, SPEC, scale=(0.08, 1.0))
    rng = np.random.default_rng(0)
    for seed in range(10):
        out = transform(constant_clip(t=4, seed=seed), rng)
        assert out.shape == (4, 3, 32, 32) and out.dtype == torch.uint8
        assert all(torch.equal(out[i], out[0]) for i in range(4))


def test_train_transform_without_rand_augment_crops_the_frame_content():
    frames = np.zeros((2, 40, 40, 3), np.uint8)
    frames[1] = 200
    out = TrainTransform(16, None, scale=(1.0, 1.0))(frames, np.random.default_rng(0))
    assert out.shape == (2, 3, 16, 16)
    assert out[0].max() == 0 and out[1].min() == 200  # whole frame, each frame its own content


@pytest.mark.parametrize("shape, box, size", [
    ((4, 3, 48, 64), (5, 7, 30, 41), 32),  # downscale a crop
    ((2, 3, 20, 28), (0, 0, 20, 28), 32),  # upscale the whole frame
    ((1, 3, 40, 40), (3, 2, 33, 35), 16),  # one frame
    ((3, 3, 32, 32), (0, 0, 32, 32), 32),  # nothing to resize
])
def test_resized_crop_equals_torchvisions_value_for_value(shape, box, size, monkeypatch):
    """The train crop's resize against torchvision's resized_crop (bilinear, antialiased) on uint8 clips, laid
    out as decoding leaves them (channels last) and contiguous; the float path of CPUs without torch's uint8
    kernel within one grey level."""
    import torchvision.transforms.v2.functional as F
    from torchvision.transforms import InterpolationMode

    top, left, h, w = box
    frames = np.random.default_rng(0).integers(0, 256, (shape[0], shape[2], shape[3], 3), dtype=np.uint8)
    channels_last = torch.from_numpy(frames).permute(0, 3, 1, 2)  # [T, 3, H, W]
    for clip in (channels_last, channels_last.contiguous()):
        theirs = F.resized_crop(clip, top, left, h, w, [size, size], interpolation=InterpolationMode.BILINEAR,
                                antialias=True)
        ours = resize_antialiased(clip[..., top:top + h, left:left + w], size)
        assert ours.dtype == torch.uint8 and torch.equal(ours, theirs)
        monkeypatch.setattr(T, "_NATIVE_UINT8_RESIZE", False)
        floats = resize_antialiased(clip[..., top:top + h, left:left + w], size)
        monkeypatch.undo()
        assert floats.dtype == torch.uint8 and (floats.int() - theirs.int()).abs().max() <= 1


def test_decoding_without_rand_augment_imports_neither_torchvision_nor_timm():
    """What a decode process of a config without RandAugment loads (about 5 s less start-up per process on 2
    cores than with torchvision and timm); RandAugment brings timm in when it is asked for."""
    script = """
import sys
import numpy as np
import evl.video.decode, evl.video.sampling, workflows.data
from evl.video.transforms import TrainTransform, test_views
frames = np.zeros((4, 40, 48, 3), np.uint8)
TrainTransform(32, None)(frames, np.random.default_rng(0)); test_views(frames, 32, 3)
print(sorted(m for m in ("torchvision", "timm") if m in sys.modules))
TrainTransform(32, "rand-m7-n4-mstd0.5-inc1")
print(sorted(m for m in ("torchvision", "timm") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["[]", "['timm', 'torchvision']"], out


def test_short_side_resize_and_three_crops_along_long_side():
    w = 91
    ramp = np.broadcast_to(np.linspace(0, 255, w, dtype=np.float32)[None, None, :, None], (2, 30, w, 3))
    resized = resize_short_side(ramp.astype(np.uint8), 20)
    assert resized.shape == (2, 20, 60, 3) and resized.dtype == np.uint8  # 91 * 20 // 30 = 60 (floor)
    clip = torch.from_numpy(resized).permute(0, 3, 1, 2)  # [2, 3, 20, 60]
    views = spatial_crops(clip, 20, 3)
    assert views.shape == (3, 2, 3, 20, 20)
    means = [v.float().mean().item() for v in views]
    assert means[0] < means[1] < means[2]  # left, centre, right
    centre = spatial_crops(clip, 20, 1)
    assert centre.shape == (1, 2, 3, 20, 20) and torch.equal(centre[0], views[1])


def test_portrait_crops_run_along_the_height():
    clip = torch.zeros(1, 3, 60, 20, dtype=torch.uint8)
    clip[..., 40:, :] = 255
    views = spatial_crops(clip, 20, 3)
    assert [int(v.float().mean()) for v in views] == [0, 0, 255]


def test_test_views_from_numpy_frames():
    frames = constant_clip(t=3, h=48, w=64)
    views = T.test_views(frames, 24, 3)
    assert views.shape == (3, 3, 3, 24, 24) and views.dtype == torch.uint8
    with pytest.raises(ValueError):
        T.test_views(frames, 24, 2)


def test_normalize_matches_clip_constants_on_any_dtype():
    clip = torch.full((2, 4, 3, 5, 5), 255, dtype=torch.uint8)  # [B, T, 3, H, W]
    out = normalize(clip)
    assert out.dtype == torch.float32 and out.shape == clip.shape
    expected = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(out[0, 0, :, 0, 0], expected)
    assert normalize(clip, dtype=torch.bfloat16).dtype == torch.bfloat16
    half = normalize(clip.to(torch.float16))
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), out, atol=2e-2, rtol=1e-2)
    zero = normalize(torch.zeros(3, 1, 1, dtype=torch.uint8))
    torch.testing.assert_close(zero.flatten(), -torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD))


def position_frames(t=2, h=36, w=96) -> np.ndarray:
    """Frames whose pixels tell where they are (red: row, green: column), so a crop from elsewhere shows."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    frame = np.stack([rows * 7, cols * 2, rows + cols], axis=-1).astype(np.uint8)
    return np.repeat(frame[None], t, axis=0)


@pytest.mark.parametrize("h, w", [(36, 96), (96, 36)], ids=["wide", "tall"])
def test_train_crop_keeps_the_video_orientation(h, w):
    """On a non-square video the crop box is drawn for height x width and cut rows x columns: the output is that
    box of the frame, resized. The box's own draw is the caller's Generator's only use without RandAugment, so the
    same seed gives it here."""
    frames = position_frames(h=h, w=w)
    transform = TrainTransform(24, None, scale=(0.2, 0.6))
    for seed in range(12):
        out = transform(frames, np.random.default_rng(seed))
        top, left, bh, bw = sample_crop_box(h, w, np.random.default_rng(seed), scale=(0.2, 0.6))
        assert top + bh <= h and left + bw <= w
        box = torch.from_numpy(frames[:, top:top + bh, left:left + bw]).permute(0, 3, 1, 2).float()
        expected = torch.nn.functional.interpolate(box, size=(24, 24), mode="bilinear", align_corners=False,
                                                   antialias=True).round()
        torch.testing.assert_close(out.float(), expected, atol=1, rtol=0)


def test_crop_box_fallback_is_full_width_on_a_tall_video_and_full_height_on_a_wide_one():
    # aspect 1/20 is outside [3/4, 4/3]: the largest centred box of aspect 3/4, full width
    assert sample_crop_box(200, 20, np.random.default_rng(0), scale=(0.99, 1.0)) == (86, 0, 27, 20)
    assert sample_crop_box(20, 200, np.random.default_rng(0), scale=(0.99, 1.0)) == (0, 86, 20, 27)
