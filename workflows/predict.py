"""`evl predict VIDEO... --checkpoint CKPT`: top-5 labels for each video, in this process (no Ray).

Views follow the checkpoint's own test setting (stride, temporal x spatial views) unless given; softmax scores
are averaged over the views as in evaluation. A video that cannot be decoded is reported and skipped.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("videos", nargs="+", metavar="VIDEO")
    parser.add_argument("--checkpoint", required=True,
                        help="decoder.pt, a Ray checkpoint directory holding one, or a reference .pth")
    parser.add_argument("--pretrained", default=None, help="backbone weights (tag or file) instead of the checkpoint's")
    parser.add_argument("--sampling-rate", type=int, default=None)
    parser.add_argument("--temporal-views", type=int, default=None)
    parser.add_argument("--spatial-views", type=int, default=None, choices=(1, 3))
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--device", default=None)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from evl.checkpoint import load_checkpoint, load_into
    from evl.model import build_model
    from evl.video.decode import VideoError
    from evl.video.kinetics import kinetics400_classes
    from workflows.evaluate import find_decoder_checkpoint

    ckpt = load_checkpoint(find_decoder_checkpoint(args.checkpoint))
    model_cfg = ckpt.model if args.pretrained is None else dataclasses.replace(ckpt.model, pretrained=args.pretrained)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(model_cfg, device).eval()
    load_into(model.classifier, ckpt, model.backbone.weights_id if args.pretrained is None else None)
    names = ckpt.class_names or kinetics400_classes()
    views = ckpt.extra.get("test_views", {})
    rate = args.sampling_rate or views.get("sampling_rate", 16)
    temporal = args.temporal_views or views.get("num_temporal_views", 3 if model_cfg.num_frames <= 8 else 1)
    spatial = args.spatial_views or views.get("num_spatial_views", 1 if model_cfg.num_frames <= 8 else 3)

    failed = 0
    for path in args.videos:
        try:
            clips = video_views(path, model_cfg.num_frames, rate, temporal, spatial, model.image_size)
        except (VideoError, ValueError) as e:
            print(f"{path}: skipped: {e}", file=sys.stderr)
            failed += 1
            continue
        with torch.inference_mode():
            probs = model(clips.to(device)).float().softmax(-1).mean(0)  # average over views
        top = probs.topk(min(args.top, len(names)))
        print(path)
        for p, i in zip(top.values.tolist(), top.indices.tolist()):
            print(f"  {p:6.3f}  {i:4d}  {names[i]}")
    return 1 if failed == len(args.videos) else 0


def video_views(path: str, num_frames: int, sampling_rate: int, temporal_views: int, spatial_views: int,
                image_size: int):
    """All test views of one video: uint8 [temporal * spatial, T, 3, S, S] (see evl.video.views)."""
    from evl.video.views import video_test_views

    return video_test_views(path, num_frames, sampling_rate, temporal_views, spatial_views, image_size)
