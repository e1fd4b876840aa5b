"""`evl eval`: multi-view evaluation of any decoder checkpoint (this project's or the reference's released ones).

Ray Data decodes every temporal x spatial view on CPU actors; the model runs in this process on the local
device; softmax scores are averaged per video. Prints top-1, top-5 and per-class accuracy and can write the
confusion matrix and per-class CSV.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from evl import storage
from evl.config import Config, DataConfig, apply_overrides, from_dict, read_yaml
from workflows import console


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="decoder.pt, a Ray checkpoint folder holding one, or a reference .pth (local or URI)")
    parser.add_argument("--manifest", required=True, help="Parquet manifest from `evl prepare` (local or URI)")
    parser.add_argument("--config", default=None,
                        help="YAML whose data options (views, stride) and model options replace the checkpoint's")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="e.g. --set data.num_temporal_views=3, or what a reference checkpoint cannot tell: "
                             "--set model.num_frames=8, --set model.backbone=ViT-L-14-336")
    parser.add_argument("--pretrained", default=None,
                        help="backbone weights (open_clip tag, file or URI) instead of the checkpoint's")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--out", default=None,
                        help="folder (local or URI) for per_class_accuracy.csv and confusion.json")


def run(args: argparse.Namespace) -> int:
    given = stated_settings(args.config, args.overrides, args.pretrained)
    result, names, skipped = evaluate_checkpoint(args.checkpoint, args.manifest, given.get("data"),
                                                 given.get("model"), batch_size=args.batch_size, device=args.device)
    console.say(f"{result.num_videos} videos  top-1 {result.top1:.4f}  top-5 {result.top5:.4f}")
    if skipped:
        console.warn(f"{len(skipped)} videos could not be decoded and were skipped:")
        for path, reason in list(skipped.items())[:20]:
            console.warn(f"  {path}: {reason}")
    for i, name in enumerate(names):
        videos = int(result.confusion[i].sum())
        if videos:
            console.say(f"  {name:<32} {result.per_class_accuracy[i]:.3f}  ({videos} videos)")
    if args.out:
        from workflows.tracking import per_class_csv

        csv_path = storage.join(args.out, "per_class_accuracy.csv")
        confusion_path = storage.join(args.out, "confusion.json")
        storage.write_text(csv_path, per_class_csv(result.per_class_accuracy, result.confusion, names))
        storage.write_text(confusion_path, json.dumps({"classes": names, "matrix": result.confusion.tolist()}))
        console.say(f"wrote {csv_path} and {confusion_path}")
    return 0


def stated_settings(config: str | None, overrides: list[str], pretrained: str | None = None) -> dict[str, dict]:
    """What the user stated for each section (the YAML, then --set, then --pretrained), without the defaults:
    a checkpoint's own settings fill the rest. Checked like any config (unknown keys, types)."""
    raw = apply_overrides(read_yaml(config) if config else {}, overrides)
    if pretrained:
        raw.setdefault("model", {})["pretrained"] = pretrained
    from_dict(Config, raw).validate()
    return {section: dict(raw.get(section) or {}) for section in ("model", "data")}


def load_for_inference(checkpoint: str | Path, model: dict[str, Any] | None = None, device: str = "cpu"):
    """(Checkpoint, EVL model in eval mode) for a decoder checkpoint, under the stated model settings.

    A project checkpoint must meet the backbone weights it was trained on, unless other weights are stated.
    """
    from evl.checkpoint import load_checkpoint, load_into, model_config_of
    from evl.model import build_model

    model = model or {}
    ckpt = load_checkpoint(checkpoint, given=model)
    net = build_model(model_config_of(ckpt, model), device).eval()
    load_into(net.classifier, ckpt, None if "pretrained" in model else net.backbone.weights_id)
    return ckpt, net


def class_names(ckpt, num_classes: int, manifest: str | None = None) -> list[str]:
    """The checkpoint's class names; else (reference checkpoints have none) the manifest's classes.json,
    Kinetics-400's for 400 classes, or numbers."""
    from evl.video.kinetics import kinetics400_classes, read_classes

    if ckpt.class_names:
        return ckpt.class_names
    if manifest:
        try:
            names = read_classes(manifest)
        except (OSError, ValueError):
            names = []
        if len(names) == num_classes:
            return names
    return kinetics400_classes() if num_classes == 400 else [f"class {i}" for i in range(num_classes)]


def test_data_config(ckpt, data: dict[str, Any] | None = None) -> DataConfig:
    """The test views to evaluate with: the stated ones, else those the run evaluated with, else (reference
    checkpoints) the reference's for its frame count: 8 x 16 with 3 x 1 views, 16 x 16 and 32 x 8 with 1 x 3."""
    frames = ckpt.model.num_frames
    reference = {"sampling_rate": 8 if frames >= 32 else 16, "num_temporal_views": 3 if frames <= 8 else 1,
                 "num_spatial_views": 1 if frames <= 8 else 3}
    return from_dict(DataConfig, {**reference, **ckpt.extra.get("test_views", {}), **(data or {})})


def evaluate_checkpoint(checkpoint: str | Path, manifest: str, data: dict[str, Any] | None = None,
                        model: dict[str, Any] | None = None, batch_size: int = 8, device: str | None = None):
    """Returns (EvalResult over the videos that decoded, class names, {path: reason} of those that did not).
    data/model: stated settings (see `stated_settings`)."""
    import torch

    from evl.metrics import ViewAccumulator
    from workflows.data import eval_dataset
    from workflows.decode_stats import decode_failures, decode_stats
    from workflows.runtime import ensure_ray

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    ckpt, net = load_for_inference(checkpoint, model, device)
    names = class_names(ckpt, net.config.num_classes, manifest)

    ensure_ray()
    cfg = Config(model=net.config, data=test_data_config(ckpt, data))
    views = ViewAccumulator(net.config.num_classes)
    with decode_stats() as stats, torch.inference_mode():
        for batch in eval_dataset(cfg, net.image_size, manifest, stats).iter_torch_batches(batch_size=batch_size):
            views.add(net(batch["clip"].to(device)), batch["label"], batch["video"])
        skipped = decode_failures(stats)["files"]
    return views.result(), names, skipped
