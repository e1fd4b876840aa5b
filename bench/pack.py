"""Packed sweep throughput: a pack of decoder depths (default {1, 2, 3, 4}) on one backbone pass, against the same
heads trained alone, one after another, on the same batches in one process.

A pack (`evl.training.Trainer` with a list of configs) runs the frozen backbone once per step, for its deepest
head, and trains one decoder + head per depth on the shared features. Alone, each depth pays the backbone itself.
The figure of merit is throughput per trial-equivalent: the pack's clips/s times its heads, against the clips/s of
the heads trained alone (all their clips over all their time). Random uint8 clips, random weights (no downloads):
only speed means anything, plus --check, which asserts that the pack's per-head losses equal the lone runs'.

    python bench/pack.py                                                    # CPU, EVL-Demo backbone, < 1 min
    python bench/pack.py --model ViT-B-16 --frames 8 --batch 32 --device cuda --check --json pack.json
    python bench/pack.py --model EVL-Tiny --depths 1 2 3                    # EVL-Tiny has 3 blocks

The CPU default is EVL-Demo (64 px, 4 blocks of width 128): EVL-Tiny has only 3 blocks, one short of depth 4.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout, installed or not

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from evl.backbone import backbone_spec  # noqa: E402  (also registers EVL-Tiny / EVL-Demo with open_clip)
from evl.config import Config, ModelConfig, TrainConfig  # noqa: E402
from evl.model import PRECISIONS, backbone_dtype  # noqa: E402
from evl.training import Trainer, decoder_precision  # noqa: E402

# Largest |loss difference| --check allows between a head in the pack and the same head alone, by the coarser of
# backbone and decoder precision. A shallower head's backbone runs its earlier blocks another way alone (open_clip's
# attention) than in the pack (the SDPA re-run of the deepest head's blocks): equal up to rounding, which the
# decoder's training carries on.
CHECK_TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 5e-2}
PRECISION_NAMES = {dtype: name for name, dtype in PRECISIONS.items()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="EVL-Demo", help="open_clip backbone (default EVL-Demo, a 4-block CPU model)")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--batch", type=int, default=None, help="clips per step (default 4 on CPU, 32 on GPU)")
    p.add_argument("--depths", type=int, nargs="+", default=[1, 2, 3, 4], help="decoder depth of each head")
    p.add_argument("--classes", type=int, default=400)
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (default 6 on CPU, 20 on GPU)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps first: kernel selection, allocator (default 1 on CPU, 3 on GPU)")
    p.add_argument("--batches", type=int, default=4, help="distinct random batches, cycled through")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, auto")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="backbone and decoder engine precision; auto: bf16 on GPU, fp32 on CPU (as training)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 on CPU: tiny ops only "
                                                              "lose to thread contention)")
    p.add_argument("--check", action="store_true", help="assert the pack's per-head losses equal the lone runs'")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    args.device = pick_device(args.device)
    gpu = args.device.type == "cuda"
    if args.batch is None:
        args.batch = 32 if gpu else 4
    if args.steps is None:
        args.steps = 20 if gpu else 6
    if args.warmup is None:
        args.warmup = 3 if gpu else 1
    if args.threads is None and not gpu:
        args.threads = 1
    if min(args.batch, args.steps, args.batches, args.frames, *args.depths) < 1 or args.warmup < 0:
        p.error("--batch, --steps, --batches, --frames and --depths must be positive, --warmup not negative")
    if len(set(args.depths)) != len(args.depths):
        p.error("--depths must differ from each other")
    return args


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no GPU")
    return device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    names = [value.strip() for key, _, value in (line.partition(":") for line in text.splitlines())
             if key.strip() == "model name"]
    return f"{names[0] if names else platform.machine()} ({torch.get_num_threads()} torch threads)"


def head_config(args: argparse.Namespace, depth: int) -> Config:
    """One head: reference model defaults (dropout 0.5, every temporal module) at `depth`, random backbone
    weights, one micro-batch per optimizer step, a schedule long enough to stay away from zero."""
    model = ModelConfig(backbone=args.model, pretrained=None, num_frames=args.frames, num_classes=args.classes,
                        decoder_num_layers=depth, backbone_precision=args.precision)
    train = TrainConfig(batch_size=args.batch, micro_batch_size=args.batch, precision=args.precision,
                        num_steps=args.warmup + args.steps + 1_000)
    return Config(name=f"bench-pack-d{depth}", model=model, train=train).validate()


def random_batches(args: argparse.Namespace) -> list[tuple[torch.Tensor, torch.Tensor]]:
    size = backbone_spec(args.model).image_size
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 256, (args.batch, args.frames, 3, size, size), dtype=torch.uint8, generator=g
                           ).to(args.device),
             torch.randint(0, args.classes, (args.batch,), generator=g).to(args.device)) for _ in range(args.batches)]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(args: argparse.Namespace, runs: list[list[int]], batches: list) -> list[dict[str, Any]]:
    """Build one trainer per run (a head per depth), then take warm-up + timed steps in turns, one step of each
    trainer after the other, over the same batches (cycled), so a slow spell of a shared machine falls on every
    run alike. Each step is timed on its own (the GPU drained before and after); a run's step time is the median
    of its timed steps. Returns per run its timing and every step's loss per head (warm-up steps included)."""
    trainers = []
    for depths in runs:
        print(f"... building {'pack' if len(depths) > 1 else 'alone'}, depths {depths}", file=sys.stderr, flush=True)
        trainers.append(Trainer([head_config(args, d) for d in depths], args.device))
    losses: list[list[torch.Tensor]] = [[] for _ in runs]
    times: list[list[float]] = [[] for _ in runs]
    print(f"... {args.warmup} + {args.steps} steps of each, in turns", file=sys.stderr, flush=True)
    for i in range(args.warmup + args.steps):
        clips, labels = batches[i % len(batches)]
        for trainer, run_losses, run_times in zip(trainers, losses, times):
            synchronize(args.device)
            start = time.perf_counter()
            run_losses.append(torch.stack([loss for loss, _ in trainer.train_micro_batch(clips, labels)]))
            synchronize(args.device)
            if i >= args.warmup:
                run_times.append(time.perf_counter() - start)
    out = []
    for depths, trainer, run_losses, run_times in zip(runs, trainers, losses, times):
        step_s = statistics.median(run_times)
        clips_per_s = args.batch / step_s
        out.append({"depths": depths, "heads": len(depths), "batch": args.batch, "steps": args.steps,
                    "seconds": step_s * args.steps, "step_ms": 1000 * step_s,
                    "step_ms_mean": 1000 * statistics.fmean(run_times), "clips_per_s": clips_per_s,
                    "clips_per_s_x_heads": clips_per_s * len(depths),
                    "backbone_ms": 1000 * time_backbone(args, trainer, batches),
                    "losses": torch.stack(run_losses).T.float().cpu().tolist()})  # [heads][steps]
    for trainer in trainers:
        trainer.close()
    del trainers
    gc.collect()
    return out


@torch.no_grad()
def time_backbone(args: argparse.Namespace, trainer: Trainer, batches: list) -> float:
    """Median seconds of one backbone forward alone (the trainer's, normalisation included): the part a pack
    shares."""
    times = []
    for i in range(args.steps):
        synchronize(args.device)
        start = time.perf_counter()
        trainer.features(batches[i % len(batches)][0])
        synchronize(args.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def summarise(pack: dict[str, Any], alone: list[dict[str, Any]]) -> dict[str, Any]:
    """The lone runs taken together (every head's clips over all their time) and the pack's gain over them."""
    alone_rate = sum(r["steps"] * r["batch"] for r in alone) / sum(r["seconds"] for r in alone)
    return {"alone_clips_per_s": alone_rate, "pack_clips_per_s_x_heads": pack["clips_per_s_x_heads"],
            "speedup": pack["clips_per_s_x_heads"] / alone_rate}


def check_losses(pack: dict[str, Any], alone: list[dict[str, Any]], tolerance: float) -> dict[str, Any]:
    diffs = [max(abs(a - b) for a, b in zip(pack["losses"][i], run["losses"][0])) for i, run in enumerate(alone)]
    return {"max_abs_loss_diff": diffs, "tolerance": tolerance, "passed": all(d <= tolerance for d in diffs)}


def format_table(pack: dict[str, Any], alone: list[dict[str, Any]], summary: dict[str, Any],
                 check: dict[str, Any] | None, title: str) -> str:
    lines = [title, ""]
    head = (f"{'run':<22} {'heads':>5} {'clips/s':>9} {'step ms':>9} {'backbone ms':>11} {'clips/s x heads':>15}")
    lines += [head, "-" * len(head)]
    for r in alone:
        lines.append(f"{'alone, depth ' + str(r['depths'][0]):<22} {1:>5} {r['clips_per_s']:>9.2f} "
                     f"{r['step_ms']:>9.1f} {r['backbone_ms']:>11.1f} {r['clips_per_s']:>15.2f}")
    lines.append(f"{'alone, all together':<22} {len(alone):>5} {summary['alone_clips_per_s']:>9.2f} {'':>9} {'':>11} "
                 f"{summary['alone_clips_per_s']:>15.2f}")
    depths = "{" + ",".join(map(str, pack["depths"])) + "}"
    lines.append(f"{'pack ' + depths:<22} {pack['heads']:>5} {pack['clips_per_s']:>9.2f} {pack['step_ms']:>9.1f} "
                 f"{pack['backbone_ms']:>11.1f} {pack['clips_per_s_x_heads']:>15.2f}")
    lines += ["", f"pack / alone (clips/s x heads): {summary['speedup']:.2f}x"]
    if check is not None:
        diffs = ", ".join(f"d{d} {x:.1e}" for d, x in zip(pack["depths"], check["max_abs_loss_diff"]))
        lines.append(f"check: max |loss(pack) - loss(alone)| per head over {len(pack['losses'][0])} steps: {diffs} "
                     f"(tolerance {check['tolerance']:g}) -> {'pass' if check['passed'] else 'FAIL'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # one INFO line per engine otherwise
    depths = list(args.depths)
    batches = random_batches(args)
    *alone, pack = time_runs(args, [[d] for d in depths] + [depths], batches)
    summary = summarise(pack, alone)
    precision = {"backbone": PRECISION_NAMES[backbone_dtype(args.precision, args.device)],
                 "decoder": decoder_precision(TrainConfig(precision=args.precision), args.device)}
    tolerance = max(CHECK_TOLERANCE[precision["backbone"]], CHECK_TOLERANCE[precision["decoder"]])
    check = check_losses(pack, alone, tolerance) if args.check else None
    device = device_name(args.device)
    title = (f"EVL packed training — {device} [{args.device}], torch {torch.__version__}, deepspeed "
             f"{deepspeed.__version__}; {args.model}, {args.frames} frames, batch {args.batch}, {args.classes} "
             f"classes, backbone {precision['backbone']}, decoder {precision['decoder']}; {args.warmup} warm-up + "
             f"{args.steps} timed steps per run, in turns, on the same {args.batches} batches cycled; step ms: "
             f"median")
    print(format_table(pack, alone, summary, check, title))
    finite = all(math.isfinite(x) for r in (pack, *alone) for head in r["losses"] for x in head)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "device": device, "device_type": args.device.type, "torch": torch.__version__,
            "deepspeed": deepspeed.__version__, "python": platform.python_version(), "precision": precision,
            "args": {**vars(args), "device": str(args.device)}, "alone": alone, "pack": pack, **summary,
            "check": check, "losses_finite": finite}, indent=2))
        print(f"\nwrote {args.json}")
    if dist.is_initialized():
        dist.destroy_process_group()
    if check is not None and not check["passed"]:
        print("FAILED: a head's losses in the pack differ from its lone run's", file=sys.stderr)
    if not finite:
        print("FAILED: a training loss is not finite", file=sys.stderr)
    return 0 if finite and (check is None or check["passed"]) else 1


if __name__ == "__main__":
    sys.exit(main())
