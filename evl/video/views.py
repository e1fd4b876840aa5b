"""Every test view of one video, from its path: what evaluation (workflows/data.py's EvalDecoder) and
`evl predict` feed the model.

Default, the reference's preprocessing: decode only the frames the temporal views need, at full size; resize
each of them once so its short side is the test size (bilinear, no antialiasing, long side floored: see
transforms.resize_short_side); then crop the spatial views. The reference decodes every frame and does the
same on CLIP-normalised floats; the clips here stay uint8 and agree with its result within half a grey level
once its normalisation is undone.

Resizing while decoding (the decoder's swscale scaler straight to the test size, what this project did
before) samples the pixels differently: swscale's bilinear filter widens when it shrinks (like an antialiased
resize) and rounds the long side instead of flooring it; smooth frames differ by a grey level or two, fine
texture by much more. With the OpenCV resize it measured no faster per video, so only the reference's way is
kept.
"""

from __future__ import annotations

import numpy as np
import torch

from evl.video.decode import probe, read_frames
from evl.video.sampling import test_indices
from evl.video.transforms import test_views


def video_test_views(path: str, num_frames: int, sampling_rate: int, temporal_views: int, spatial_views: int,
                     image_size: int, *, video_frames: int | None = None,
                     size: tuple[int, int] | None = None) -> torch.Tensor:
    """All test views of the video at `path`: uint8 [temporal_views * spatial_views, T, 3, S, S].

    View t * spatial_views + s is temporal view t (sampling.test_indices) cropped at spatial position s.
    video_frames, size: the video's frame count and (width, height) when known (e.g. from a manifest);
    otherwise the video is probed for its frame count.
    Raises VideoError for a video that cannot be decoded.
    """
    if video_frames is None:
        info = probe(path)
        video_frames, size = info.num_frames, (info.width, info.height)
    indices = test_indices(video_frames, num_frames, sampling_rate, temporal_views).reshape(-1)  # [Vt*T]
    wanted, where = np.unique(indices, return_inverse=True)  # each frame decoded and resized once
    frames = read_frames(path, wanted, size=size)  # [U, H, W, 3], full size
    crops = test_views(frames, image_size, spatial_views)  # [Vs, U, 3, S, S]
    views = crops[:, torch.from_numpy(where.reshape(-1))]  # [Vs, Vt*T, 3, S, S]
    views = views.reshape(spatial_views, temporal_views, num_frames, 3, image_size, image_size)
    return views.transpose(0, 1).reshape(-1, num_frames, 3, image_size, image_size).contiguous()
