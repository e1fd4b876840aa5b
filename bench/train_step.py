"""Training-step throughput and peak GPU memory: clips/s of `Trainer.train_micro_batch` as training runs it.

One training step here is exactly what the training workflow does per micro-batch: the frozen backbone's
forward (no autograd, bf16 on GPU), then the decoder and head forward and backward and the optimizer step inside
the DeepSpeed engine. Inputs are random uint8 clips and labels, the weights random (no downloads), so only
speed and memory mean anything. The backbone's forward alone (bf16, inference mode) is measured too, as the
ceiling: a training step can never be faster than it.

Cases (batch = clips per step; 16- and 32-frame cases keep the 8-frame case's frames per batch):
    B16-8f, B16-16f, B16-32f, L14-8f     training step, ViT-B/16 or ViT-L/14 at 8/16/32 frames
    B16-8f-backbone, L14-8f-backbone     backbone forward only, same inputs as the 8-frame case

    python bench/train_step.py --check --json train_step.json     # full-size cases (GPU)
    python bench/train_step.py --tiny --check                     # EVL-Tiny backbone: a CPU smoke run in seconds
    python bench/train_step.py --cases B16-8f B16-8f-backbone --batch 64 --steps 50

The table compares each case with the reference implementation measured on one H200 (see
/work/shared/evl-reference.md, "Measured here") and with this project's targets on one H100/H200. --check
also compares logits of the fast path (the Trainer's bf16 backbone and engine) with an fp32 model holding the
same weights, so a speed-up that breaks numerics shows up here and not weeks into a run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import json
import logging
import math
import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout, installed or not

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from evl.backbone import backbone_spec  # noqa: E402  (also registers EVL-Tiny with open_clip)
from evl.config import Config, ModelConfig, TrainConfig  # noqa: E402
from evl.model import PRECISIONS, backbone_dtype, build_model  # noqa: E402
from evl.training import Trainer, decoder_precision  # noqa: E402

GIB = 1024**3
BASE_FRAMES = 8  # --batch counts clips at this many frames; longer clips keep the frames per batch
TINY_BACKBONE = "EVL-Tiny"  # 32 px, 3 blocks: every case shrinks to it with --tiny
TINY_DECODER_LAYERS = 2
CHECK_CLIPS = 8  # clips compared by --check (fewer if the batch is smaller)
# Relative L2 error of the logits allowed by --check: bf16/fp16 keep 8/11 mantissa bits, and the error grows
# through the backbone's depth; fp32 against fp32 should agree to rounding.
CHECK_TOLERANCE = {"bf16": 5e-2, "fp16": 2e-2, "fp32": 1e-5}
PRECISION_NAMES = {dtype: name for name, dtype in PRECISIONS.items()}


@dataclass(frozen=True)
class Case:
    """One measurement, with what the reference reached and what this project aims for (None: no figure)."""

    name: str
    backbone: str  # open_clip model name
    frames: int
    train: bool  # False: the backbone's forward only
    reference_clips_per_s: float | None = None
    reference_peak_gib: float | None = None
    target_clips_per_s: float | None = None  # and peak memory no higher than the reference's

    @property
    def target_peak_gib(self) -> float | None:
        return self.reference_peak_gib if self.target_clips_per_s else None


# Reference figures: the authors' code on one H200, batch 32 clips at 8 frames, 8 at 32 frames, fp16. The
# backbone rows' references are open_clip's image forward in bf16 (10,513 frames/s B/16, 2,656 frames/s L/14)
# divided by 8 frames.
CASES = {c.name: c for c in (
    Case("B16-8f", "ViT-B-16", 8, True, reference_clips_per_s=213, reference_peak_gib=6.8, target_clips_per_s=1000),
    Case("B16-16f", "ViT-B-16", 16, True),
    Case("B16-32f", "ViT-B-16", 32, True, reference_clips_per_s=62),
    Case("L14-8f", "ViT-L-14", 8, True, reference_clips_per_s=70, reference_peak_gib=19.6, target_clips_per_s=280),
    Case("B16-8f-backbone", "ViT-B-16", 8, False, reference_clips_per_s=10_513 / 8),
    Case("L14-8f-backbone", "ViT-L-14", 8, False, reference_clips_per_s=2_656 / 8),
)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES), metavar="CASE",
                   help=f"subset to run (default: all): {', '.join(CASES)}")
    p.add_argument("--batch", type=int, default=None,
                   help=f"clips per step at {BASE_FRAMES} frames (default 32; 4 with --tiny); 16/32-frame cases "
                        "get the same frames per step (16 and 8 clips at the default)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per case")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (kernel selection, allocator)")
    p.add_argument("--device", default="auto", help="auto (cuda if there is one), cuda, cuda:1, cpu")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="backbone and decoder engine precision; auto: bf16 on GPU, fp32 on CPU (as training)")
    p.add_argument("--host-clips", action="store_true",
                   help="keep clips in host memory, so each step also pays the copy to the GPU (as the Ray "
                        "workflow feeds them); default: clips already on the device")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 with --tiny, whose tiny ops only lose to "
                        "thread contention)")
    p.add_argument("--tiny", action="store_true", help=f"every case on the {TINY_BACKBONE} backbone (CPU smoke run)")
    p.add_argument("--check", action="store_true", help="also compare fast-path logits with an fp32 model")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.batch is None:
        args.batch = 4 if args.tiny else 32
    if args.threads is None and args.tiny:
        args.threads = 1
    if min(args.batch, args.steps) < 1 or args.warmup < 0:
        p.error("--batch and --steps must be positive, --warmup not negative")
    return args


# --------------------------------------------------------------------------------------------------------------
# Small pure helpers


def batch_for(frames: int, batch_at_base: int) -> int:
    """Clips per step for `frames`-frame clips, keeping the frames per step of `batch_at_base` 8-frame clips."""
    return max(1, batch_at_base * BASE_FRAMES // frames)


def cpu_model(cpuinfo: str) -> str:
    """The CPU's name from /proc/cpuinfo text ("model name" on x86, "Model"/"CPU part" elsewhere)."""
    for key in ("model name", "Model", "Hardware"):
        for line in cpuinfo.splitlines():
            name, _, value = line.partition(":")
            if name.strip() == key and value.strip():
                return value.strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    return f"{cpu_model(text)} ({torch.get_num_threads()} torch threads)"


def compare_logits(fast: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """How far the fast path's logits are from the fp32 ones: max |diff|, and relative L2 error (the verdict)."""
    fast, ref = fast.double(), ref.double()
    diff = (fast - ref).abs()
    return {"max_abs_diff": diff.max().item(), "max_abs_ref": ref.abs().max().item(),
            "rel_l2": (diff.norm() / ref.norm().clamp_min(1e-30)).item(),
            "top1_agreement": (fast.argmax(-1) == ref.argmax(-1)).double().mean().item()}


def add_ceiling_fraction(rows: list[dict[str, Any]]) -> None:
    """Set each training row's `of_ceiling`: its frames/s over the backbone-only frames/s of the same case
    backbone (None when that backbone row was not run). What is left above it is the decoder's and optimizer's."""
    ceiling = {CASES[r["case"]].backbone: r["frames_per_s"] for r in rows if r["kind"] == "backbone_forward"}
    for r in rows:
        top = ceiling.get(CASES[r["case"]].backbone) if r["kind"] == "train_step" else None
        r["of_ceiling"] = r["frames_per_s"] / top if top else None


def verdict(row: dict[str, Any], comparable: bool) -> str:
    """'meets' / 'MISSES' the case's target (speed, and peak memory where the reference has one); '-' without a
    target; 'n/a' where the figures are not comparable (CPU, --tiny, or a batch other than the reference's)."""
    target = row["target_clips_per_s"]
    if target is None:
        return "-"
    if not comparable:
        return "n/a"
    fast_enough = row["clips_per_s"] >= target
    small_enough = row["target_peak_gib"] is None or (row["peak_gib"] is not None
                                                      and row["peak_gib"] <= row["target_peak_gib"])
    return "meets" if fast_enough and small_enough else "MISSES"


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: list[dict[str, Any]], checks: list[dict[str, Any]], title: str) -> str:
    """The results as fixed-width text: one row per case, then one per numerics check."""
    lines = [title, "of ceil: a training step's frames/s as a fraction of the backbone-only forward's", ""]
    head = (f"{'case':<16} {'backbone':<9} {'frames':>6} {'batch':>5} {'clips/s':>9} {'frames/s':>9} "
            f"{'step ms':>8} {'peak GiB':>8} {'of ceil':>7} | {'ref clips/s':>11} {'ref GiB':>7} {'x ref':>6} | "
            f"{'target':>14}  verdict")
    lines += [head, "-" * len(head)]
    for r in rows:
        target = "-" if r["target_clips_per_s"] is None else (
            f">={r['target_clips_per_s']:g}" + (f", <={r['target_peak_gib']:g}G" if r["target_peak_gib"] else ""))
        lines.append(
            f"{r['case']:<16} {r['backbone']:<9} {r['frames']:>6} {r['batch']:>5} {r['clips_per_s']:>9.1f} "
            f"{r['frames_per_s']:>9.0f} {r['step_ms']:>8.1f} {_fmt(r['peak_gib'], '8.2f'):>8} "
            f"{_fmt(r['of_ceiling'], '7.0%'):>7} | "
            f"{_fmt(r['reference_clips_per_s'], '11.0f'):>11} {_fmt(r['reference_peak_gib'], '7.1f'):>7} "
            f"{_fmt(r['x_reference'], '6.2f'):>6} | {target:>14}  {r['verdict']}")
    if checks:
        lines += ["", "numerics: fast-path logits vs fp32 model, same weights and clips (eval mode)",
                  (f"{'case':<16} {'path':<28} {'clips':>5} {'max|diff|':>10} {'max|ref|':>9} {'rel L2':>9} "
                   f"{'tol':>7} {'top1 agree':>10}  result")]
        for c in checks:
            lines.append(
                f"{c['case']:<16} {c['path']:<28} {c['clips']:>5} {c['max_abs_diff']:>10.3g} {c['max_abs_ref']:>9.3g} "
                f"{c['rel_l2']:>9.2e} {c['tolerance']:>7.0e} {c['top1_agreement']:>10.0%}  "
                f"{'pass' if c['passed'] else 'FAIL'}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Measuring


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no GPU")
    return device


def config_for(case: Case, args: argparse.Namespace) -> Config:
    """The training config of `case`: reference model defaults (400 classes, 4 decoder layers, dropout), random
    backbone weights, one micro-batch per optimizer step."""
    batch = batch_for(case.frames, args.batch)
    model = ModelConfig(backbone=TINY_BACKBONE if args.tiny else case.backbone, pretrained=None,
                        num_frames=case.frames, backbone_precision=args.precision)
    if args.tiny:
        model.decoder_num_layers = TINY_DECODER_LAYERS
    train = TrainConfig(batch_size=batch, micro_batch_size=batch, precision=args.precision,
                        num_steps=args.warmup + args.steps + 1_000)  # the cosine schedule stays away from zero
    return Config(name=f"bench-{case.name}", model=model, train=train).validate()


def random_batch(cfg: Config, device: torch.device, host: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 clips [B, T, 3, H, W] and labels, seeded, on the device (or in host memory with --host-clips)."""
    size = backbone_spec(cfg.model.backbone).image_size
    g = torch.Generator().manual_seed(0)
    b = cfg.train.micro_batch_size
    clips = torch.randint(0, 256, (b, cfg.model.num_frames, 3, size, size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, cfg.model.num_classes, (b,), generator=g)
    return (clips, labels) if host else (clips.to(device), labels.to(device))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], Any], warmup: int, steps: int, device: torch.device) -> tuple[float, Any]:
    """Seconds for `steps` calls after `warmup` untimed ones, the GPU drained before and after (wall clock on
    CPU). Nothing syncs inside the loop, so the host runs ahead as it does in training. Returns the last output."""
    for _ in range(warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        out = step()
    synchronize(device)
    return time.perf_counter() - start, out


@contextlib.contextmanager
def measured_memory(device: torch.device) -> Iterator[dict[str, float | None]]:
    """Peak GPU memory (GiB) of what runs inside, after freeing the previous case; also what was still allocated
    when it started (should be ~0: more means an earlier case leaked into this one's peak)."""
    gc.collect()
    stats: dict[str, float | None] = {"peak_gib": None, "leftover_gib": None}
    if device.type != "cuda":
        yield stats
        return
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    stats["leftover_gib"] = torch.cuda.memory_allocated(device) / GIB
    yield stats
    stats["peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB


@contextlib.contextmanager
def strict_fp32() -> Iterator[None]:
    """fp32 really computed in fp32 (no TF32 matmuls or convolutions) for the check's reference model."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def result_row(case: Case, cfg: Config, seconds: float, steps: int, memory: dict[str, float | None]) -> dict[str, Any]:
    clips = steps * cfg.train.micro_batch_size
    full_size = cfg.model.backbone == case.backbone  # not --tiny: a ratio to the reference means something
    return {"case": case.name, "kind": "train_step" if case.train else "backbone_forward",
            "backbone": cfg.model.backbone, "frames": case.frames, "batch": cfg.train.micro_batch_size,
            "steps": steps, "seconds": seconds, "step_ms": 1000 * seconds / steps,
            "clips_per_s": clips / seconds, "frames_per_s": clips * case.frames / seconds, **memory,
            "reference_clips_per_s": case.reference_clips_per_s, "reference_peak_gib": case.reference_peak_gib,
            "x_reference": clips / seconds / case.reference_clips_per_s if full_size and case.reference_clips_per_s
            else None,
            "target_clips_per_s": case.target_clips_per_s, "target_peak_gib": case.target_peak_gib}


def run_train_case(case: Case, args: argparse.Namespace, device: torch.device
                   ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Time `Trainer.train_micro_batch` on one random batch, then (with --check) compare its numerics."""
    cfg = config_for(case, args)
    with measured_memory(device) as memory:
        trainer = Trainer(cfg, device)
        clips, labels = random_batch(cfg, device, args.host_clips)
        step = functools.partial(trainer.train_micro_batch, clips, labels)
        seconds, [(loss, _)] = time_steps(step, args.warmup, args.steps, device)  # one head: one (loss, correct)
    row = result_row(case, cfg, seconds, args.steps, memory)
    row["final_loss"] = loss.item()
    row["loss_finite"] = math.isfinite(row["final_loss"])
    check = numerics_check(case, trainer, clips, device) if args.check else None
    trainer.close()  # drops the optimizer's gradient hooks, which otherwise keep decoder and
    del trainer, step, clips, labels, loss  # optimizer state alive into the next case's peak memory
    return row, check


def run_backbone_case(case: Case, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Time the backbone's forward alone (normalisation included), as the trainer calls it, in inference mode:
    the ceiling for a training step on the same inputs. The peak includes the unused decoder's weights."""
    cfg = config_for(case, args)
    with measured_memory(device) as memory:
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model, device)
        clips, _ = random_batch(cfg, device, args.host_clips)
        with torch.inference_mode():
            seconds, _ = time_steps(functools.partial(model.features, clips), args.warmup, args.steps, device)
    del model, clips
    return result_row(case, cfg, seconds, args.steps, memory)


@torch.no_grad()
def numerics_check(case: Case, trainer: Trainer, clips: torch.Tensor, device: torch.device) -> dict[str, Any]:
    """Logits of the trained engine on the fast path (the Trainer's backbone and engine precision) against an fp32
    model (fp32 backbone from the same seed, decoder weights copied from the engine), same clips, eval mode.

    The decoder has taken warmup + timed steps, so its zero-initialised parts (query token, position embeddings,
    temporal cross-attention tables) are no longer zero and every path contributes to the logits."""
    cfg = trainer.cfg
    clips = clips[:CHECK_CLIPS].to(device)
    trainer.engine.eval()
    fast = trainer.engine(trainer.model.features(clips)).float()
    trainer.engine.train()
    with strict_fp32():
        ref_model = build_model(dataclasses.replace(cfg.model, backbone_precision="fp32"), device).eval()
        ref_model.classifier.load_state_dict(trainer.engine.module.state_dict())
        ref = ref_model(clips).float()
    del ref_model
    backbone = PRECISION_NAMES[trainer.model.backbone.dtype]
    engine = decoder_precision(cfg.train, device)
    tolerance = max(CHECK_TOLERANCE[backbone], CHECK_TOLERANCE[engine])
    stats = compare_logits(fast, ref)
    return {"case": case.name, "path": f"backbone {backbone}, decoder {engine}", "clips": len(clips), **stats,
            "tolerance": tolerance, "passed": bool(stats["rel_l2"] <= tolerance)}


# --------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # one INFO line per engine otherwise
    precision = {"backbone": PRECISION_NAMES[backbone_dtype(args.precision, device)],
                 "decoder": decoder_precision(TrainConfig(precision=args.precision), device)}
    # Reference and targets are for full-size models at batch 32 on a GPU, trained as configured by default.
    comparable = (device.type == "cuda" and not args.tiny and args.batch == 32
                  and precision == {"backbone": "bf16", "decoder": "bf16"})
    rows, checks = [], []
    for name in args.cases:
        case = CASES[name]
        print(f"... {name}", file=sys.stderr, flush=True)
        if case.train:
            row, check = run_train_case(case, args, device)
            checks += [check] if check else []
        else:
            row = run_backbone_case(case, args, device)
        row["verdict"] = verdict(row, comparable)
        rows.append(row)
    add_ceiling_fraction(rows)

    title = (f"EVL training step — {device_name(device)} [{device}], torch {torch.__version__}, deepspeed "
             f"{deepspeed.__version__}, backbone {precision['backbone']}, decoder {precision['decoder']}"
             f"{', TINY backbone ' + TINY_BACKBONE if args.tiny else ''}, "
             f"clips on {'host' if args.host_clips else 'device'}, {args.warmup} warm-up + {args.steps} timed steps\n"
             f"reference: authors' code on one H200 (fp16); targets: one H100/H200"
             f"{'' if comparable else ' (verdicts need: GPU, full-size backbones, --batch 32, bf16)'}")
    print(format_table(rows, checks, title))
    checks_passed = all(c["passed"] for c in checks)
    losses_finite = all(r.get("loss_finite", True) for r in rows)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "device": device_name(device), "device_type": device.type, "torch": torch.__version__,
            "deepspeed": deepspeed.__version__, "python": platform.python_version(), "precision": precision,
            "tiny": args.tiny, "comparable_to_reference": comparable, "args": vars(args), "results": rows,
            "checks": checks, "check_passed": checks_passed if args.check else None,
            "losses_finite": losses_finite}, indent=2))
        print(f"\nwrote {args.json}")
    if dist.is_initialized():
        dist.destroy_process_group()
    if not checks_passed:
        print("FAILED: a numerics check is out of tolerance", file=sys.stderr)
    if not losses_finite:
        print("FAILED: a training loss is not finite", file=sys.stderr)
    passed = checks_passed and losses_finite
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
