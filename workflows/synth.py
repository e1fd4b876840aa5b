"""`evl synth`: write the synthetic video dataset (real h264 files, CVDF Kinetics layout), cached.

Output: <out>/videos/*.mp4, <out>/annotations/{train,val}.csv, <out>/synth.json (the parameters; a rerun
with the same parameters finds it and does nothing). Prepare it with `evl prepare --dataset <out> ...`.
"""

from __future__ import annotations

import argparse
import os
import time
from workflows import console


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from evl.video.synth import SYNTH_CLASSES, SynthParams

    d = SynthParams()
    parser.add_argument("--out", required=True, help="dataset folder to write")
    parser.add_argument("--classes", type=int, default=d.num_classes,
                        help=f"number of classes, the first N of: {', '.join(SYNTH_CLASSES)}")
    parser.add_argument("--train-per-class", type=int, default=d.train_per_class)
    parser.add_argument("--val-per-class", type=int, default=d.val_per_class)
    parser.add_argument("--size", type=int, nargs="+", default=[d.width], metavar="S",
                        help="frame size: S (square) or W H; even numbers")
    parser.add_argument("--frames", type=int, default=d.frames, help="frames per video")
    parser.add_argument("--fps", type=int, default=d.fps)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="encoding processes")


def params_from_args(args: argparse.Namespace):
    from evl.video.synth import SynthParams

    if len(args.size) not in (1, 2):
        raise ValueError("--size takes S or W H")
    width, height = (args.size[0], args.size[0]) if len(args.size) == 1 else args.size
    return SynthParams(num_classes=args.classes, train_per_class=args.train_per_class,
                       val_per_class=args.val_per_class, width=width, height=height, frames=args.frames,
                       fps=args.fps, seed=args.seed)


def run(args: argparse.Namespace) -> int:
    from evl.video.synth import SYNTH_CLASSES, is_generated, write_synth_dataset

    try:
        params = params_from_args(args)
        params.validate()
    except ValueError as e:
        console.warn(f"evl synth: {e}")
        return 2
    names = ", ".join(SYNTH_CLASSES[: params.num_classes])
    if is_generated(args.out, params):
        console.say(f"{args.out}: already generated with these parameters ({names})")
        return 0
    start = time.perf_counter()
    rows = write_synth_dataset(args.out, params, workers=args.workers)
    console.say(f"{args.out}: wrote {len(rows)} videos ({params.width}x{params.height}, {params.frames} frames at "
                f"{params.fps} fps) of {params.num_classes} classes ({names}) in {time.perf_counter() - start:.1f} s")
    console.say(f"next: evl prepare --dataset {args.out} --out {os.path.join(args.out, 'manifests')}")
    return 0
