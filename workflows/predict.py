"""`evl predict VIDEO... --checkpoint CKPT`: top-5 labels for each video, in this process (no Ray).

Views follow the checkpoint's own test setting (stride, temporal x spatial views) unless given; softmax scores
are averaged over the views as in evaluation. A video that cannot be decoded is reported and skipped.
"""

from __future__ import annotations

import argparse

from workflows import console


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("videos", nargs="+", metavar="VIDEO", help="video files or URIs")
    parser.add_argument("--checkpoint", required=True,
                        help="decoder.pt, a Ray checkpoint folder holding one, or a reference .pth (local or URI)")
    parser.add_argument("--pretrained", default=None,
                        help="backbone weights (tag, file or URI) instead of the checkpoint's")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="model or test-view settings, e.g. what a reference checkpoint cannot tell: "
                             "--set model.num_frames=8, --set data.num_temporal_views=3")
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--device", default=None)


def run(args: argparse.Namespace) -> int:
    import torch

    from evl.video.decode import VideoError
    from workflows.evaluate import class_names, load_for_inference, stated_settings, test_data_config

    given = stated_settings(None, args.overrides, args.pretrained)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ckpt, model = load_for_inference(args.checkpoint, given["model"], device)
    names = class_names(ckpt, model.config.num_classes)
    views = test_data_config(ckpt, given["data"])  # the views the run was evaluated with, unless stated

    failed = 0
    for path in args.videos:
        try:
            clips = video_views(path, model.config.num_frames, views.sampling_rate, views.num_temporal_views,
                                views.num_spatial_views, model.image_size)
        except (VideoError, ValueError) as e:
            console.warn(f"{path}: skipped: {e}")
            failed += 1
            continue
        with torch.inference_mode():
            probs = model(clips.to(device)).float().softmax(-1).mean(0)  # average over views
        top = probs.topk(min(args.top, len(names)))
        console.say(path)
        for p, i in zip(top.values.tolist(), top.indices.tolist()):
            console.say(f"  {p:6.3f}  {i:4d}  {names[i]}")
    return 1 if failed == len(args.videos) else 0


def video_views(path: str, num_frames: int, sampling_rate: int, temporal_views: int, spatial_views: int,
                image_size: int):
    """All test views of one video: uint8 [temporal * spatial, T, 3, S, S] (see evl.video.views)."""
    from evl.video.views import video_test_views

    return video_test_views(path, num_frames, sampling_rate, temporal_views, spatial_views, image_size)
