"""Clip augmentation (train) and view cropping (test), all on uint8, plus CLIP normalisation.

Clips stay uint8 until the model normalises them on its device: that keeps the data pipeline's memory and
transfer cost at a quarter of float32. Train: timm RandAugment with the same operations and magnitudes on
every frame (evl/video/randaugment.py), then one RandomResizedCrop box for all frames. Test: the reference's
preprocessing (short side resized to the input size, bilinear without antialiasing; then one centre crop or
three crops along the long side), within half a grey level of its float result.

Only torch, NumPy and OpenCV here: torchvision and timm cost a decode process about 5 s of start-up on a 2-core
machine, and only RandAugment needs them.
"""

from __future__ import annotations

import math
import platform

import cv2
import numpy as np
import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize(clip: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """uint8 (or 0..255 float) [..., 3, H, W] -> (x / 255 - mean) / std, on the clip's device.

    dtype: output dtype; default float32 for integer input, else the input's dtype.
    """
    if dtype is None:
        dtype = clip.dtype if clip.is_floating_point() else torch.float32
    shape = (3, 1, 1)
    mean = torch.tensor(CLIP_MEAN, device=clip.device, dtype=torch.float32).view(shape) * 255
    inv_std = 1 / (torch.tensor(CLIP_STD, device=clip.device, dtype=torch.float32).view(shape) * 255)
    return ((clip.to(torch.float32) - mean) * inv_std).to(dtype)


# --------------------------------------------------------------------------------------------------------------
# Crops


def sample_crop_box(height: int, width: int, rng: np.random.Generator,
                    scale: tuple[float, float] = (0.08, 1.0),
                    ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (top, left, h, w): area fraction in `scale`, log-uniform aspect in `ratio`.

    Ten tries, then the largest centred box with an aspect inside `ratio` (torchvision's rule), drawn from
    the caller's Generator so a seed reproduces the crop.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _to_tchw(frames: np.ndarray) -> torch.Tensor:
    """uint8 [T, H, W, 3] numpy -> uint8 [T, 3, H, W] torch view (channels-last memory: fast resizes)."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)


class TrainTransform:
    """Frames [T, H, W, 3] uint8 -> augmented clip [T, 3, S, S] uint8 (RandAugment, then RandomResizedCrop)."""

    def __init__(self, image_size: int, rand_augment: str | None = "rand-m7-n4-mstd0.5-inc1",
                 scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)):
        self.image_size = image_size
        self.rand_augment = None
        if rand_augment:
            from evl.video.randaugment import ClipRandAugment  # timm, only where it is used

            self.rand_augment = ClipRandAugment(rand_augment, image_size)
        self.scale, self.ratio = scale, ratio

    def __call__(self, frames: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        if self.rand_augment is not None:
            frames = self.rand_augment(frames, rng)
        clip = _to_tchw(frames)  # [T, 3, H, W]
        top, left, h, w = sample_crop_box(clip.shape[-2], clip.shape[-1], rng, self.scale, self.ratio)
        out = resize_antialiased(clip[..., top:top + h, left:left + w], self.image_size)
        return out.contiguous()  # [T, 3, S, S]


# torch's uint8 bilinear kernel, where the CPU has it (torchvision's rule); elsewhere float, then rounded
_NATIVE_UINT8_RESIZE = (torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
                        or platform.machine() in ("aarch64", "arm64"))


def resize_antialiased(clip: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [T, 3, h, w] -> uint8 [T, 3, size, size]: bilinear with antialiasing, value for value what
    torchvision's Resize gives a uint8 tensor (tests/test_video_transforms.py compares the two)."""
    if clip.shape[-2:] == (size, size):
        return clip
    native = _NATIVE_UINT8_RESIZE and clip.device.type == "cpu"
    x = clip if native else clip.to(torch.float32)
    out = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                                          antialias=True)
    return out if native else out.round_().to(torch.uint8)


def short_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) with the short side = `size` and the long side = long * size // short (the reference's
    floor)."""
    if height <= width:
        return size, width * size // height
    return height * size // width, size


def resize_short_side(frames: np.ndarray, size: int) -> np.ndarray:
    """uint8 [T, H, W, 3] -> uint8 [T, h, w, 3] with the short side = `size` (long side: see short_side_size).

    The reference's test resize: bilinear, pixel centres aligned (torch's align_corners=False), edges
    clamped, no antialiasing. The reference resizes the CLIP-normalised float clip; that normalisation is a
    per-channel affine map and bilinear weights sum to one, so resizing the 0..255 values as floats and
    rounding gives its clip within half a grey level once its normalisation is undone. OpenCV's float32
    INTER_LINEAR is that same interpolation (tests/test_video_views.py checks it against torch's
    interpolate) and 8-13x faster than torch's on one core; one frame at a time, so full-size frames never
    all exist as floats at once.
    """
    h, w = frames.shape[1:3]
    new_h, new_w = short_side_size(h, w, size)
    if (new_h, new_w) == (h, w):
        return frames
    out = np.empty((len(frames), new_h, new_w, 3), np.uint8)
    for frame, target in zip(frames, out):
        resized = cv2.resize(frame.astype(np.float32), (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        np.clip(np.rint(resized, out=resized), 0, 255, out=resized)
        target[:] = resized
    return out


def spatial_crops(clip: torch.Tensor, size: int, num_views: int) -> torch.Tensor:
    """[T, 3, H, W] with min(H, W) == size -> [V, T, 3, size, size]: the reference's crops, centre (V=1) at
    ((H - size) // 2, (W - size) // 2), or at 0, margin // 2 and margin along the long side (V=3)."""
    if num_views not in (1, 3):
        raise ValueError(f"num_views must be 1 or 3, got {num_views}")
    h, w = clip.shape[-2:]
    long_is_width = w >= h
    extra = (w if long_is_width else h) - size
    offsets = [extra // 2] if num_views == 1 else [0, extra // 2, extra]
    other = ((h if long_is_width else w) - size) // 2
    views = []
    for offset in offsets:
        top, left = (other, offset) if long_is_width else (offset, other)
        views.append(clip[..., top:top + size, left:left + size])
    return torch.stack(views).contiguous()


def test_views(frames: np.ndarray, image_size: int, num_spatial_views: int) -> torch.Tensor:
    """Frames [T, H, W, 3] uint8 -> spatial views [V, T, 3, S, S] uint8 (reference resize, then crops)."""
    clip = _to_tchw(resize_short_side(frames, image_size))
    return spatial_crops(clip, image_size, num_spatial_views)
