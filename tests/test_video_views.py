"""Test views equal what the reference's test preprocessing yields on the same decoded frames.

`reference_clips` restates that preprocessing literally (shared/evl-reference.md, "Data pipeline of the
reference"): every frame of the video to float in [0, 1], CLIP-normalised; the whole clip resized so its short
side is S (long side floored) with torch bilinear, align_corners=False, no antialias, on the normalised floats;
spatial crops; then temporal views (a short video padded with its last frame; one view at slide // 2, V views
at round(slide / (V - 1) * v)). Its clips, with the normalisation undone (x * std + mean) * 255, must agree
with this project's uint8 views within one grey level. Videos here are real h264 files; the reference's
"decode every frame" is plain PyAV.
"""

from __future__ import annotations

import av
import cv2
import numpy as np
import pytest
import torch

from data_helpers import frame_index, write_level_video
from evl.video.synth import encode_video
from evl.video import transforms
from evl.video.transforms import CLIP_MEAN, CLIP_STD, resize_short_side, short_side_size
from evl.video.views import video_test_views

views_of_frames = transforms.test_views  # not imported by its name: pytest would collect it as a test
MEAN = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(CLIP_STD).view(1, 3, 1, 1)


# --------------------------------------------------------------------------------------------------------------
# The reference, restated


def decode_every_frame(path) -> np.ndarray:
    """uint8 [N, H, W, 3]: every frame, in order, as the reference decodes a video (PyAV, RGB)."""
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def reference_spatial(frames: np.ndarray, size: int, spatial_views: int) -> list[torch.Tensor]:
    """The reference's float pipeline on uint8 [N, H, W, 3]: each spatial crop as normalised float [N, 3, S, S]."""
    clip = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255  # [N, 3, H, W] in [0, 1]
    clip = (clip - MEAN) / STD
    h, w = clip.shape[-2:]
    if h < w:
        new_h, new_w = size, w * size // h
    else:
        new_h, new_w = h * size // w, size
    clip = torch.nn.functional.interpolate(clip, size=(new_h, new_w), mode="bilinear", align_corners=False,
                                           antialias=False)
    if spatial_views == 1:
        boxes = [((new_h - size) // 2, (new_w - size) // 2)]
    else:
        margin = max(new_h, new_w) - size
        offsets = [0, margin // 2, margin]
        boxes = [(0, o) for o in offsets] if new_w >= new_h else [(o, 0) for o in offsets]
    return [clip[..., top:top + size, left:left + size] for top, left in boxes]


def reference_clips(frames: np.ndarray, num_frames: int, rate: int, temporal_views: int, spatial_views: int,
                    size: int) -> torch.Tensor:
    """All test clips of a video given every decoded frame, normalisation undone: float [Vt*Vs, T, 3, S, S]
    in the project's view order (temporal view t, spatial view s at t * Vs + s)."""
    crops = reference_spatial(frames, size, spatial_views)
    span = (num_frames - 1) * rate + 1
    if len(frames) < span:  # pad with the last frame
        crops = [torch.cat([c, c[-1:].expand(span - len(frames), -1, -1, -1)]) for c in crops]
    slide = crops[0].shape[0] - span
    if temporal_views == 1:
        starts = [slide // 2]
    else:
        starts = [round(slide / (temporal_views - 1) * v) for v in range(temporal_views)]
    clips = [crop[start:start + span:rate] for start in starts for crop in crops]
    return torch.stack([(c * STD + MEAN) * 255 for c in clips])


def assert_within_one_grey_level(ours: torch.Tensor, reference: torch.Tensor) -> None:
    assert ours.dtype == torch.uint8 and ours.shape == reference.shape, (ours.shape, reference.shape)
    diff = (ours.double() - reference.double()).abs()
    assert diff.max() <= 1.0, f"max {diff.max():.3f}, mean {diff.mean():.4f}"


# --------------------------------------------------------------------------------------------------------------
# Inputs with spatial detail, so that any other resize (antialiased, another sampling grid, another size) shows


def detailed_frames(num_frames: int, height: int, width: int, seed: int = 0, shift: int = 3) -> np.ndarray:
    """uint8 [T, H, W, 3]: a lightly blurred colour-noise texture moving `shift` pixels per frame, so every
    frame has fine detail and differs from the others."""
    rng = np.random.default_rng(seed)
    texture = rng.integers(0, 256, (height, width + shift * num_frames, 3)).astype(np.float32)
    texture = cv2.GaussianBlur(texture, (0, 0), 0.8)
    texture = np.clip((texture - 128) * 2.5 + 128, 0, 255).astype(np.uint8)
    return np.stack([texture[:, shift * t: shift * t + width] for t in range(num_frames)])


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("views")
    paths = {
        "landscape": root / "landscape.mp4",  # 76 x 100, 40 frames
        "portrait": root / "portrait.mp4",  # 90 x 60, 12 frames
        "small": root / "small.mp4",  # 30 x 40, 20 frames: upscaled to the test size
    }
    encode_video(paths["landscape"], detailed_frames(40, 76, 100, seed=1))
    encode_video(paths["portrait"], detailed_frames(12, 90, 60, seed=2), pix_fmt="yuv444p")
    encode_video(paths["small"], detailed_frames(20, 30, 40, seed=3))
    paths["level"] = write_level_video(root / "level.mp4", 40)  # 40 x 64, frame i has grey level 4 + 6 i
    paths["level_short"] = write_level_video(root / "level_short.mp4", 10)
    return {k: str(v) for k, v in paths.items()}


# --------------------------------------------------------------------------------------------------------------
# Resize and crops on decoded frames


def test_short_side_size_floors_the_long_side():
    assert short_side_size(256, 340, 224) == (224, 297)  # 340 * 224 / 256 = 297.5
    assert short_side_size(340, 256, 224) == (297, 224)
    assert short_side_size(100, 100, 32) == (32, 32)
    assert short_side_size(30, 40, 48) == (48, 64)


@pytest.mark.parametrize("height, width, size", [
    (76, 100, 32),  # downscale by 2.4: aliasing-sensitive
    (76, 100, 38),  # exactly 2x
    (76, 100, 57),  # mild downscale
    (60, 91, 40),  # long side 60.67: floored to 60
    (90, 60, 48),  # portrait
    (30, 40, 48),  # upscale
    (64, 64, 40),  # square
    (48, 100, 48),  # short side already the test size: crops only
])
@pytest.mark.parametrize("spatial_views", [1, 3])
def test_views_match_the_reference_float_pipeline(height, width, size, spatial_views):
    frames = detailed_frames(3, height, width, seed=height + width)
    ours = views_of_frames(frames, size, spatial_views)  # [Vs, T, 3, S, S]
    reference = torch.stack(reference_spatial(frames, size, spatial_views))
    assert_within_one_grey_level(ours, (reference * STD + MEAN) * 255)


def test_resize_is_torch_bilinear_without_antialias_within_half_a_grey_level():
    frames = detailed_frames(4, 76, 100)
    ours = torch.from_numpy(resize_short_side(frames, 32)).permute(0, 3, 1, 2).double()
    exact = torch.nn.functional.interpolate(torch.from_numpy(frames).permute(0, 3, 1, 2).double(), size=(32, 42),
                                            mode="bilinear", align_corners=False, antialias=False)
    assert ours.shape == exact.shape and (ours - exact).abs().max() <= 0.5 + 1e-6
    assert resize_short_side(frames, 76) is frames  # nothing to do


def test_views_of_decoded_frames_match_the_reference(videos):
    frames = decode_every_frame(videos["landscape"])  # [40, 76, 100, 3], as decoded from h264
    for spatial_views in (1, 3):
        reference = torch.stack(reference_spatial(frames, 32, spatial_views))
        assert_within_one_grey_level(views_of_frames(frames, 32, spatial_views), (reference * STD + MEAN) * 255)


# --------------------------------------------------------------------------------------------------------------
# End to end: from the video's path, decoding only the frames the views need


@pytest.mark.parametrize("name, num_frames, rate, temporal_views, spatial_views, size", [
    ("landscape", 8, 4, 1, 1, 32),  # span 29, slide 11: one view at 5 (not round(5.5) = 6)
    ("landscape", 8, 4, 3, 1, 32),
    ("landscape", 4, 8, 1, 3, 38),
    ("landscape", 8, 4, 3, 3, 37),  # long side 48.68: floored to 48
    ("portrait", 4, 4, 2, 3, 48),  # span 13 > 12 frames: padded with the last frame
    ("small", 8, 2, 3, 3, 48),
    ("level", 8, 4, 3, 3, 24),
    ("level_short", 4, 4, 1, 1, 24),
])
def test_video_views_match_the_reference_given_every_frame(videos, name, num_frames, rate, temporal_views,
                                                         spatial_views, size):
    ours = video_test_views(videos[name], num_frames, rate, temporal_views, spatial_views, size)
    assert ours.shape == (temporal_views * spatial_views, num_frames, 3, size, size)
    reference = reference_clips(decode_every_frame(videos[name]), num_frames, rate, temporal_views,
                                spatial_views, size)
    assert_within_one_grey_level(ours, reference)


def reference_indices(n: int, num_frames: int, rate: int, temporal_views: int) -> list[list[int]]:
    span = (num_frames - 1) * rate + 1
    slide = max(n - span, 0)
    starts = [slide // 2] if temporal_views == 1 else [round(slide / (temporal_views - 1) * v)
                                                       for v in range(temporal_views)]
    return [[min(s + i * rate, n - 1) for i in range(num_frames)] for s in starts]


@pytest.mark.parametrize("num_frames, rate, temporal_views", [(8, 4, 1), (8, 4, 3), (4, 16, 2), (16, 3, 3)])
def test_level_video_views_show_the_references_frames(videos, num_frames, rate, temporal_views):
    """Frames whose grey level encodes their index: each view holds exactly the reference's frames."""
    views = video_test_views(videos["level"], num_frames, rate, temporal_views, 3, 24)  # [Vt*3, T, 3, 24, 24]
    shown = [[frame_index(frame.permute(1, 2, 0).numpy(), 40) for frame in view] for view in views]
    expected = reference_indices(40, num_frames, rate, temporal_views)
    assert shown == [indices for indices in expected for _ in range(3)]  # each temporal view, 3 crops


def test_segment_sampling_views(videos):
    """Segment sampling (the project's own test rule) through the same path: the chosen frames, cropped."""
    from evl.video.sampling import test_indices

    views = video_test_views(videos["level"], 4, -1, 2, 1, 24)
    shown = [[frame_index(frame.permute(1, 2, 0).numpy(), 40) for frame in view] for view in views]
    assert shown == test_indices(40, 4, -1, 2).tolist()


def test_eval_decoder_and_predict_use_the_same_views(videos, monkeypatch):
    import workflows.data as data
    from workflows.predict import video_views

    monkeypatch.setattr(data, "stats_actor", lambda name: None)  # no Ray here
    threads, cv2_threads = torch.get_num_threads(), cv2.getNumThreads()
    try:
        batch = {"path": np.array([videos["landscape"], videos["portrait"]]), "label": np.array([3, 5]),
                 "num_frames": np.array([40, 12]), "width": np.array([100, 60]), "height": np.array([76, 90]),
                 "video": np.array([0, 1])}
        decoder = data.EvalDecoder(4, 4, 32, 2, 3, stats="unused")
        out = next(decoder(batch))
        assert out["clip"].shape == (12, 4, 3, 32, 32) and out["clip"].dtype == np.uint8
        assert out["view"].tolist() == list(range(6)) * 2 and out["video"].tolist() == [0] * 6 + [1] * 6
        for i, path in enumerate(batch["path"]):
            expected = video_views(path, 4, 4, 2, 3, 32).numpy()
            np.testing.assert_array_equal(out["clip"][6 * i: 6 * i + 6], expected)
        reference = reference_clips(decode_every_frame(videos["landscape"]), 4, 4, 2, 3, 32)
        assert_within_one_grey_level(torch.from_numpy(out["clip"][:6]), reference)
    finally:
        torch.set_num_threads(threads)
        cv2.setNumThreads(cv2_threads)
