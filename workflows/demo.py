"""`evl demo`: the whole workflow on this machine, with nothing to download.

Synthetic videos (cached) -> `evl prepare` on a local Ray -> `evl train` with DeepSpeed on 2 CPU workers ->
multi-view evaluation of the best checkpoint -> a summary with where the run is and how to look at it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from evl.config import load_config

ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=str(DEMO_CONFIG))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--data", default="data/synth", help="where the synthetic dataset is (or is written)")
    parser.add_argument("--classes", type=int, default=8, help="synthetic classes (6 of the first 8 are motion)")


def run(args: argparse.Namespace) -> int:
    from evl.video.synth import MOTION_CLASSES, SynthParams, is_generated, write_synth_dataset
    from workflows.data import cpus_needed
    from workflows.evaluate import evaluate_checkpoint
    from workflows.prepare import prepare_dataset
    from workflows.runtime import ensure_ray
    from workflows.train import train

    start = time.perf_counter()
    data = Path(args.data)
    manifests = data / "manifests"
    cfg = load_config(args.config, [f"data.train_manifest={manifests / 'train.parquet'}",
                                    f"data.val_manifest={manifests / 'val.parquet'}",
                                    f"model.num_classes={args.classes}", *args.overrides])

    params = SynthParams(num_classes=args.classes)
    if is_generated(data, params):
        print(f"[1/4] synthetic videos: cached in {data}")
    else:
        print(f"[1/4] synthetic videos: writing {data} ...", flush=True)
        write_synth_dataset(data, params, workers=2)
    ensure_ray(min_cpus=cpus_needed(cfg))  # 2 trainers + 2 decode actors; on 2 cores they share them
    if (manifests / "train.parquet").is_file() and (manifests / "val.parquet").is_file():
        print(f"[2/4] manifests: cached in {manifests}")
    else:
        print("[2/4] manifests: probing every video on Ray Data ...", flush=True)
        prepare_dataset(str(data), str(manifests))

    print(f"[3/4] training {cfg.model.backbone} EVL ({cfg.model.decoder_num_layers} decoder layers, "
          f"{cfg.model.num_frames} frames) with DeepSpeed on {cfg.scaling.num_workers} CPU workers ...", flush=True)
    result = train(cfg)

    print("[4/4] multi-view evaluation of the best checkpoint ...", flush=True)
    evaluation, names = evaluate_checkpoint(result.checkpoint_dir, cfg.data.val_manifest)
    motion = [i for i, n in enumerate(names) if n in MOTION_CLASSES]
    correct = sum(int(evaluation.confusion[i, i]) for i in motion)
    total = sum(int(evaluation.confusion[i].sum()) for i in motion)

    print()
    print(result.summary())
    print(f"  evaluation: top-1 {evaluation.top1:.3f} on {evaluation.num_videos} videos "
          f"(chance {1 / len(names):.3f}); motion classes only: {correct / max(1, total):.3f} "
          f"({correct}/{total})")
    print(f"  demo wall time: {time.perf_counter() - start:.0f} s")
    return 0
