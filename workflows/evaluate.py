"""`evl eval`: multi-view evaluation of any decoder checkpoint (this project's or the reference's released ones).

Ray Data decodes every temporal x spatial view on CPU actors; the model runs in this process on the local
device; softmax scores are averaged per video. Prints top-1, top-5 and per-class accuracy and can write the
confusion matrix and per-class CSV.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from evl.config import Config, DataConfig, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="decoder.pt, a Ray checkpoint directory holding one, or a reference .pth")
    parser.add_argument("--manifest", required=True, help="Parquet manifest from `evl prepare`")
    parser.add_argument("--config", default=None, help="YAML for the data options (views, stride)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--pretrained", default=None,
                        help="backbone weights (open_clip tag or file) instead of the checkpoint's")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--out", default=None, help="directory for per_class_accuracy.csv and confusion.json")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides) if args.config or args.overrides else Config()
    result, names = evaluate_checkpoint(args.checkpoint, args.manifest, cfg.data, pretrained=args.pretrained,
                                        batch_size=args.batch_size, device=args.device)
    print(f"{result.num_videos} videos  top-1 {result.top1:.4f}  top-5 {result.top5:.4f}")
    for i, name in enumerate(names):
        videos = int(result.confusion[i].sum())
        if videos:
            print(f"  {name:<32} {result.per_class_accuracy[i]:.3f}  ({videos} videos)")
    if args.out:
        from workflows.tracking import per_class_csv

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "per_class_accuracy.csv").write_text(per_class_csv(result.per_class_accuracy, result.confusion, names))
        (out / "confusion.json").write_text(json.dumps({"classes": names, "matrix": result.confusion.tolist()}))
    return 0


def find_decoder_checkpoint(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / "decoder.pt"
    return path


def evaluate_checkpoint(checkpoint: str | Path, manifest: str, data: DataConfig, pretrained: str | None = None,
                        batch_size: int = 8, device: str | None = None):
    """Returns (EvalResult, class names)."""
    import torch

    from evl.checkpoint import load_checkpoint, load_into
    from evl.metrics import ViewAccumulator
    from evl.model import build_model
    from evl.video.kinetics import kinetics400_classes
    from workflows.data import eval_dataset
    from workflows.runtime import ensure_ray

    ckpt = load_checkpoint(find_decoder_checkpoint(checkpoint))
    model_cfg = ckpt.model if pretrained is None else dataclasses.replace(ckpt.model, pretrained=pretrained)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(model_cfg, device).eval()
    load_into(model.classifier, ckpt, model.backbone.weights_id if pretrained is None else None)
    names = ckpt.class_names or kinetics400_classes()

    ensure_ray()
    cfg = Config(model=model_cfg, data=data)
    views = ViewAccumulator(model_cfg.num_classes)
    with torch.inference_mode():
        for batch in eval_dataset(cfg, model.image_size, manifest).iter_torch_batches(batch_size=batch_size):
            views.add(model(batch["clip"].to(device)), batch["label"], batch["video"])
    return views.result(), names
