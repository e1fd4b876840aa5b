"""Clip augmentation (train) and view cropping (test), all on uint8, plus CLIP normalisation.

Clips stay uint8 until the model normalises them on its device: that keeps the data pipeline's memory and
transfer cost at a quarter of float32. Train: timm RandAugment with the same operations and magnitudes on
every frame, then one RandomResizedCrop box for all frames. Test: the reference's preprocessing (short side
resized to the input size, bilinear without antialiasing; then one centre crop or three crops along the long
side), within half a grey level of its float result.
"""

from __future__ import annotations

import copy
import math
import random

import cv2
import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from timm.data import auto_augment as timm_aa
from timm.data.auto_augment import rand_augment_transform
from torchvision.transforms import InterpolationMode

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
# RandAugment, one draw per clip


class ClipRandAugment:
    """timm's RandAugment policy, drawn once per clip and applied identically to every frame.

    The op list comes from the caller's Generator. Each op's decisions (apply or skip, magnitude noise, sign)
    are timm's own: its op is run once per clip with Python's `random` seeded from that Generator and its
    image function swapped for a recorder. The recorded op is then applied to every frame: the affine ops
    (rotate, shear, translate) and sharpness with OpenCV, 3-10x faster than PIL's kernels and within a grey
    level of them (PIL's sampling grid, edge and fill rules kept; tests/test_video_transforms.py compares the
    two), every other op with timm's PIL function.
    The caller's `random` state is restored afterwards. The affine ops resample bilinearly; the reference
    implementation leaves PIL's bicubic default, which OpenCV's cubic kernel does not reproduce.
    """

    def __init__(self, spec: str, image_size: int, mean: tuple[float, float, float] = CLIP_MEAN):
        hparams = {
            "translate_const": int(image_size * 0.45),
            "img_mean": tuple(min(255, round(255 * m)) for m in mean),
            "interpolation": Image.BILINEAR,
        }
        self.spec = spec
        self.augment = rand_augment_transform(spec, hparams)
        cv2.setNumThreads(1)  # one decode process per core; OpenCV would otherwise start a thread per core

    def draw(self, rng: np.random.Generator) -> list[tuple[object, int]]:
        """The (op, seed) pairs for one clip."""
        ra = self.augment
        weights = ra.choice_weights
        picks = rng.choice(len(ra.ops), ra.num_layers, replace=weights is None, p=weights)
        return [(ra.ops[i], int(rng.integers(2**63))) for i in picks]

    @staticmethod
    def decide(op, seed: int) -> tuple[tuple, dict] | None:
        """timm's decision for this op and seed: the image function's (args, kwargs), or None to skip it."""
        recorded = []
        probe = copy.copy(op)
        probe.aug_fn = lambda _image, *args, **kwargs: recorded.append((args, kwargs))
        saved = random.getstate()
        try:
            random.seed(seed)
            probe(None)
        finally:
            random.setstate(saved)
        return recorded[0] if recorded else None

    def __call__(self, frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """uint8 [T, H, W, 3] -> uint8 [T, H, W, 3]."""
        clip: list = list(frames)  # per frame: an [H, W, 3] array, or a PIL image after a PIL op
        for op, seed in self.draw(rng):
            decision = self.decide(op, seed)
            if decision is not None:
                clip = _apply_op(op.aug_fn, *decision, clip)
        return np.stack([np.asarray(frame) for frame in clip])


def _apply_op(fn, args: tuple, kwargs: dict, clip: list) -> list:
    """One timm op with fixed arguments on every frame (arrays or PIL images, converted as each path needs)."""
    first = clip[0]
    height, width = first.shape[:2] if isinstance(first, np.ndarray) else (first.height, first.width)
    affine = _pil_affine(fn, args, width, height)
    if affine is not None:
        if kwargs.get("resample", Image.BILINEAR) != Image.BILINEAR:
            raise ValueError("the OpenCV path implements timm's affine ops with bilinear resampling only")
        warp = _PilAffine(affine, width, height, kwargs["fillcolor"])
        return [warp(np.asarray(frame)) for frame in clip]
    if fn is timm_aa.sharpness:
        return [_sharpen_like_pil(np.asarray(frame), *args) for frame in clip]
    return [fn(frame if isinstance(frame, Image.Image) else Image.fromarray(frame), *args, **dict(kwargs))
            for frame in clip]


def _pil_affine(fn, args: tuple, width: int, height: int) -> tuple[float, ...] | None:
    """PIL AFFINE data (a, b, c, d, e, f): output (x, y) samples input (a x + b y + c, d x + e y + f), for
    timm's geometric ops; None for the others."""
    if fn is timm_aa.shear_x:
        return (1, args[0], 0, 0, 1, 0)
    if fn is timm_aa.shear_y:
        return (1, 0, 0, args[0], 1, 0)
    if fn is timm_aa.translate_x_rel:
        return (1, 0, args[0] * width, 0, 1, 0)
    if fn is timm_aa.translate_y_rel:
        return (1, 0, 0, 0, 1, args[0] * height)
    if fn is timm_aa.translate_x_abs:
        return (1, 0, args[0], 0, 1, 0)
    if fn is timm_aa.translate_y_abs:
        return (1, 0, 0, 0, 1, args[0])
    if fn is timm_aa.rotate:  # Image.rotate: counter-clockwise about the centre, same size
        angle = -math.radians(args[0])
        cos, sin = math.cos(angle), math.sin(angle)
        cx, cy = width / 2, height / 2
        return (cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy)
    return None


class _PilAffine:
    """PIL's bilinear AFFINE transform of uint8 [H, W, 3] frames, with OpenCV.

    PIL samples at pixel centres (x + 0.5, y + 0.5) and reads the input at index (source - 0.5); OpenCV's
    inverse map works on indices, hence the shifted offsets. PIL fills a pixel whose source centre is outside
    the image and replicates the edge for the rest; a nearest-neighbour warp of ones finds those pixels once
    for all frames.
    """

    def __init__(self, data: tuple[float, ...], width: int, height: int, fill: tuple[int, ...]):
        a, b, c, d, e, f = data
        self.matrix = np.array([[a, b, c + (a + b - 1) / 2], [d, e, f + (d + e - 1) / 2]], np.float64)
        self.size = (width, height)
        inside = cv2.warpAffine(np.ones((height, width), np.uint8), self.matrix, self.size,
                                flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT)
        self.outside = (inside == 0).view(np.uint8)  # [H, W], 1 where PIL fills
        self.fill = np.empty((height, width, 3), np.uint8)
        self.fill[:] = fill

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        out = cv2.warpAffine(frame, self.matrix, self.size, flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                             borderMode=cv2.BORDER_REPLICATE)
        return cv2.copyTo(self.fill, self.outside, out)


def _sharpen_like_pil(frame: np.ndarray, factor: float) -> np.ndarray:
    """ImageEnhance.Sharpness of uint8 [H, W, 3]: a blend of the frame with its SMOOTH-filtered copy (whose
    one-pixel border PIL leaves unfiltered)."""
    smooth = cv2.filter2D(frame, -1, _SMOOTH, borderType=cv2.BORDER_REPLICATE)
    smooth[[0, -1]] = frame[[0, -1]]
    smooth[:, [0, -1]] = frame[:, [0, -1]]
    return cv2.addWeighted(frame, factor, smooth, 1 - factor, 0)


_SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13  # PIL's ImageFilter.SMOOTH


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
        self.rand_augment = ClipRandAugment(rand_augment, image_size) if rand_augment else None
        self.scale, self.ratio = scale, ratio

    def __call__(self, frames: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        if self.rand_augment is not None:
            frames = self.rand_augment(frames, rng)
        clip = _to_tchw(frames)  # [T, 3, H, W]
        top, left, h, w = sample_crop_box(clip.shape[-2], clip.shape[-1], rng, self.scale, self.ratio)
        out = F.resized_crop(clip, top, left, h, w, [self.image_size, self.image_size],
                             interpolation=InterpolationMode.BILINEAR, antialias=True)
        return out.contiguous()  # [T, 3, S, S]


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
        views.append(F.crop(clip, top, left, size, size))
    return torch.stack(views).contiguous()


def test_views(frames: np.ndarray, image_size: int, num_spatial_views: int) -> torch.Tensor:
    """Frames [T, H, W, 3] uint8 -> spatial views [V, T, 3, S, S] uint8 (reference resize, then crops)."""
    clip = _to_tchw(resize_short_side(frames, image_size))
    return spatial_crops(clip, image_size, num_spatial_views)
