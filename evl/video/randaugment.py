"""RandAugment on clips: timm's policy, drawn once per clip and applied alike to every frame.

Its own module because it is the only part of the data path that needs timm (and, through timm,
torchvision, which imports torch's compiler stack: about 5 s per process on a 2-core machine). Decode
processes of a config without RandAugment never import it.
"""

from __future__ import annotations

import copy
import math
import random

import cv2
import numpy as np
from PIL import Image
from timm.data import auto_augment as timm_aa
from timm.data.auto_augment import rand_augment_transform

from evl.video.transforms import CLIP_MEAN


class ClipRandAugment:
    """timm's RandAugment policy, drawn once per clip and applied identically to every frame.

    The op list comes from the caller's Generator. Each op's decisions (apply or skip, magnitude noise, sign)
    are timm's own: its op is run once per clip with Python's `random` seeded from that Generator and its
    image function swapped for a recorder. The recorded op is then applied to every frame: the affine ops
    (rotate, shear, translate) and sharpness with OpenCV, 3-10x faster than PIL's kernels and within a grey
    level of them (PIL's sampling grid, edge and fill rules kept; tests/test_video_randaugment.py compares the
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
