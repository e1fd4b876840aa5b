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
    parser.add_argument("--data", default=None, help="where the synthetic dataset is (or is written); default "
                                                      "data/synth (data/synth-quick with --quick)")
    parser.add_argument("--classes", type=int, default=None,
                        help="synthetic classes (6 of the first 8 are motion; default 8, 3 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="a one-minute check that everything runs: 3 classes of 8 videos, a tiny model, 20 steps "
                             "(accuracy means nothing)")


# --quick: every stage of the demo on a dataset and model small enough to run in about a minute.
QUICK_VIDEOS = dict(train_per_class=8, val_per_class=2, frames=24)
QUICK_OVERRIDES = ["model.backbone=EVL-Tiny", "model.num_frames=4", "model.decoder_num_layers=2",
                   "data.sampling_rate=4", "train.batch_size=8", "train.micro_batch_size=4", "train.num_steps=20",
                   "train.log_every=5", "train.eval_every=20", "train.checkpoint_every=20",
                   "data.passes_per_epoch=7"]  # 168 clips: one decode actor pool for all 20 steps


def run(args: argparse.Namespace) -> int:
    from evl.video.synth import MOTION_CLASSES, SynthParams, is_generated, write_synth_dataset
    from workflows import console
    from workflows.data import cpus_needed
    from workflows.evaluate import evaluate_checkpoint
    from workflows.prepare import prepare_dataset
    from workflows.runtime import ensure_ray
    from workflows.train import describe, train

    start = time.perf_counter()
    data = Path(args.data or ("data/synth-quick" if args.quick else "data/synth"))
    classes = args.classes or (3 if args.quick else 8)
    manifests = data / "manifests"
    cfg = load_config(args.config, [f"data.train_manifest={manifests / 'train.parquet'}",
                                    f"data.val_manifest={manifests / 'val.parquet'}", f"model.num_classes={classes}",
                                    *(QUICK_OVERRIDES if args.quick else []), *args.overrides])

    params = SynthParams(num_classes=classes, **(QUICK_VIDEOS if args.quick else {}))
    cached = is_generated(data, params)
    if cached:
        console.say(f"[1/4] synthetic videos: cached in {data}")
    else:
        console.say(f"[1/4] synthetic videos: writing {data} ...")
        write_synth_dataset(data, params, workers=2)
    ensure_ray(min_cpus=cpus_needed(cfg))  # 2 trainers + 2 decode actors; on 2 cores they share them
    if cached and (manifests / "train.parquet").is_file() and (manifests / "val.parquet").is_file():
        console.say(f"[2/4] manifests: cached in {manifests}")
    else:
        console.say("[2/4] manifests: probing every video on Ray Data ...")
        prepare_dataset(str(data), str(manifests))

    console.say(f"[3/4] training {describe(cfg)}")
    result = train(cfg, progress=True)

    console.say("[4/4] multi-view evaluation of the best checkpoint ...")
    evaluation, names, _ = evaluate_checkpoint(result.checkpoint_dir, cfg.data.val_manifest)
    motion = [i for i, n in enumerate(names) if n in MOTION_CLASSES]
    correct = sum(int(evaluation.confusion[i, i]) for i in motion)
    total = sum(int(evaluation.confusion[i].sum()) for i in motion)
    console.say(f"  top-1 {evaluation.top1:.3f} on {evaluation.num_videos} videos (chance {1 / len(names):.3f}); "
                f"motion classes only: {correct / max(1, total):.3f} ({correct}/{total})")

    console.say()
    console.say(result.summary())
    console.say(f"demo finished in {console.duration(time.perf_counter() - start)}")
    return 0
