"""`evl prepare`: annotations + videos -> one Parquet manifest per split, after probing every video on Ray.

Reads CVDF Kinetics annotations (`<dataset>/annotations/<split>.csv`, or the CSVs given) or list files
(`<path> <label>` lines under a data root), finds each video, then probes them all in parallel as a Ray
Data job (decode first and last frame, read count/fps/size). Unusable videos and bad annotation lines are
excluded and listed with their reason; they never stop the job.

Output in --out: `<split>.parquet` per split, `classes.json`, `summary.json` (also printed).

With `--transcode DEST`, every usable video is then re-encoded (evl.video.transcode: h264, short side
`--short-side`, a keyframe every `--keyint` frames, same frames and frame rate) as a second Ray Data job, one
CPU per task, into DEST in the dataset's layout (each file's path relative to the dataset root, or to
--data-root for list files; extension .mp4). The manifests in --out then point at the copies (path, width,
height, fps of the copy; frame counts are equal by construction and checked); the originals' manifests go to
`<out>/originals/`. Resumable: a copy that is already complete (decodes, right frame count and size, not older
than its original) is kept. Inputs that fail are listed with their reason and left out of the copies'
manifests. Originals are only read; DEST may not be the dataset root, be inside it or hold it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from dataclasses import asdict

import numpy as np
import pyarrow as pa

from evl import storage
from evl.storage import join
from evl.video.kinetics import (
    CLASSES_FILE,
    ParsedSplit,
    choose_classes,
    cvdf_labels,
    cvdf_split,
    find_videos,
    kinetics400_classes,
    list_file_split,
    read_classes,
    write_classes,
    write_manifest,
)
from workflows import console

PROBE_BATCH = 8  # videos per probe call (a task probes 1-8 such batches)
TRANSCODE_PER_TASK = 4  # at most this many videos per transcode task (seconds each: tasks stay short)
ORIGINALS = "originals"  # with --transcode: <out>/originals/<split>.parquet describe the original files


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", help="dataset root (local folder or URI): CVDF layout, or the data root of "
                                          "list files")
    parser.add_argument("--annotations", nargs="+", metavar="CSV_OR_LIST",
                        help="annotation files (default: <dataset>/annotations/<split>.csv); .csv = CVDF, "
                             "anything else = '<path> <label>' list file")
    parser.add_argument("--list-file", nargs="+", metavar="LIST", help="list files, one per split (see --splits)")
    parser.add_argument("--data-root", help="root that list-file paths are relative to (default: --dataset)")
    parser.add_argument("--out", required=True, help="output folder (local or URI) for manifests and summary")
    parser.add_argument("--splits", nargs="+", default=None,
                        help="split names, in the order of the annotation files (default: train val, or each "
                             "file's name)")
    parser.add_argument("--classes", help="JSON list of class names to use (default: Kinetics-400's if every "
                                          "label is one, else the sorted labels)")
    parser.add_argument("--address", default=None, help="Ray address (default: local Ray or RAY_ADDRESS)")
    parser.add_argument("--max-listed", type=int, default=None,
                        help="print at most this many bad files/lines per kind (all are in summary.json)")
    from evl.video.transcode import DEFAULT_CRF, DEFAULT_KEYINT, DEFAULT_PRESET, DEFAULT_SHORT_SIDE, PRESETS

    t = parser.add_argument_group("training-ready copies (--transcode)")
    t.add_argument("--transcode", metavar="DEST",
                   help="re-encode every usable video into DEST (local folder or URI), same layout, and point "
                        "the manifests in --out at the copies; the originals' manifests go to <out>/originals")
    t.add_argument("--short-side", type=int, default=None,
                   help=f"short side of the copies in pixels, even (default {DEFAULT_SHORT_SIDE}); smaller "
                        "videos keep their size")
    t.add_argument("--keyint", "--keyframe-interval", dest="keyint", type=int, default=None, metavar="FRAMES",
                   help=f"a keyframe at least every FRAMES frames (default {DEFAULT_KEYINT}): a clip's decoding "
                        "starts at the keyframe before its first frame")
    t.add_argument("--crf", type=int, default=None, help=f"x264 quality, lower is better (default {DEFAULT_CRF})")
    t.add_argument("--preset", choices=PRESETS, default=None, help=f"x264 preset (default {DEFAULT_PRESET})")
    parser.add_argument("--decode-resources", type=json.loads, default=None, metavar="JSON",
                        help="custom Ray resources that every probe and transcode task asks for, to keep them on "
                             "the CPU nodes, e.g. '{\"decode_node\": 0.001}' (as data.decode_resources)")


def run(args: argparse.Namespace) -> int:
    from workflows.runtime import ensure_ray

    if not args.dataset and not args.list_file and not args.annotations:
        console.warn("evl prepare: give --dataset, --annotations or --list-file")
        return 2
    try:
        settings = _settings(args)
        _check_resources(args.decode_resources)
        if args.transcode:  # before starting Ray: a bad destination is refused at once
            _check_destination(args.transcode, _layout_root(args.dataset, args.data_root))
    except ValueError as e:
        console.warn(f"evl prepare: {e}")
        return 2
    ensure_ray(args.address)
    try:
        summary = prepare_dataset(args.dataset, args.out, splits=args.splits, annotations=args.annotations,
                                  list_files=args.list_file, data_root=args.data_root, classes=args.classes,
                                  transcode=args.transcode, settings=settings, resources=args.decode_resources)
    except (ValueError, FileNotFoundError) as e:
        console.warn(f"evl prepare: {e}")
        return 2
    console.say(format_summary(summary, args.max_listed))
    return 0 if any(s["usable"] for s in summary["splits"].values()) else 1


def _settings(args: argparse.Namespace):
    """The transcode settings from the flags (None without --transcode, where the flags are refused)."""
    from evl.video.transcode import TranscodeSettings

    given = {k: getattr(args, k, None) for k in ("short_side", "keyint", "crf", "preset")}
    given = {k: v for k, v in given.items() if v is not None}
    if not getattr(args, "transcode", None):
        if given:
            raise ValueError(f"--{next(iter(given)).replace('_', '-')} needs --transcode DEST")
        return None
    settings = TranscodeSettings(**given)
    settings.validate()
    return settings


def _check_resources(resources) -> None:
    if resources is not None and not (isinstance(resources, dict) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in resources.values())):
        raise ValueError(f"--decode-resources must be a JSON object of numbers, got {resources!r}")


# --------------------------------------------------------------------------------------------------------------
# Annotation sources


def _sources(dataset: str | None, splits: list[str] | None, annotations: list[str] | None,
             list_files: list[str] | None) -> list[tuple[str, str]]:
    """(split, annotation file) pairs."""
    files = list(annotations or []) + list(list_files or [])
    if not files:
        if not dataset:
            raise ValueError("no annotations: give --dataset with an annotations/ folder, or --annotations")
        names = splits or ["train", "val"]
        return [(name, join(dataset, "annotations", f"{name}.csv")) for name in names]
    if splits and len(splits) != len(files):
        raise ValueError(f"{len(splits)} split names for {len(files)} annotation files")
    names = splits or [_stem(f) for f in files]
    if len(set(names)) != len(names):
        raise ValueError(f"split names must differ, got {names} (pass --splits)")
    return list(zip(names, files))


def _stem(path: str) -> str:
    return os.path.splitext(storage.basename(path))[0]


def _is_csv(path: str) -> bool:
    return path.lower().endswith(".csv")


def _class_list(sources: list[tuple[str, str]], classes: str | None) -> tuple[list[str], str]:
    """(class names, where they came from)."""
    if classes:
        return read_classes(classes), classes
    csvs = [f for _, f in sources if _is_csv(f)]
    if not csvs:
        return kinetics400_classes(), "kinetics400"
    names = choose_classes(cvdf_labels(csvs))
    return names, "kinetics400" if names == kinetics400_classes() else "sorted labels"


def parse_sources(dataset: str | None, sources: list[tuple[str, str]], classes: list[str],
                  data_root: str | None = None) -> dict[str, ParsedSplit]:
    """Annotation file of each split -> entries (videos found), skipped lines, missing videos."""
    videos = None
    parsed = {}
    for split, path in sources:
        if _is_csv(path):
            if videos is None:
                if not dataset:
                    raise ValueError("CVDF annotations need --dataset (where the videos are)")
                videos = find_videos(dataset)
            parsed[split] = cvdf_split(path, videos, classes)
        else:
            root = data_root or dataset
            if not root:
                raise ValueError(f"list file {path} needs --data-root (or --dataset)")
            parsed[split] = list_file_split(path, root, classes)
    return parsed


# --------------------------------------------------------------------------------------------------------------
# Probing on Ray Data


def probe_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Add num_frames, fps, width, height and error ("" when usable) to a batch of rows with a `path`."""
    from evl.video.decode import VideoError, probe

    out = {k: [] for k in ("num_frames", "fps", "width", "height", "error")}
    for path in batch["path"]:
        try:
            info = probe(str(path))
            values = (info.num_frames, info.fps, info.width, info.height, "")
        except VideoError as e:
            values = (0, 0.0, 0, 0, e.reason)
        except Exception as e:  # noqa: BLE001 - an unexpected failure is still just this video's problem
            values = (0, 0.0, 0, 0, f"{type(e).__name__}: {e}")
        for key, value in zip(out, values):
            out[key].append(value)
    return {**batch, "num_frames": np.asarray(out["num_frames"], np.int64), "fps": np.asarray(out["fps"], np.float64),
            "width": np.asarray(out["width"], np.int64), "height": np.asarray(out["height"], np.int64),
            "error": np.asarray(out["error"], dtype=object)}


def probe_all(rows: list[dict], resources: dict | None = None) -> pa.Table:
    """Probe every row's video as one Ray Data job; rows come back with probe columns, in input order."""
    import ray

    if not rows:
        return pa.table({})
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    per_task = int(np.clip(len(rows) // (4 * cpus), PROBE_BATCH, 8 * PROBE_BATCH))  # >= 4 tasks per CPU
    ds = _row_dataset(rows, per_task).map_batches(probe_batch, batch_size=PROBE_BATCH, batch_format="numpy",
                                                  num_cpus=1, resources=resources or None)
    result = pa.concat_tables(ray.get(ds.to_arrow_refs()))
    return result.sort_by("order")


def _row_dataset(rows: list[dict], per_task: int):
    """Rows (plus an "order" column: their position) as a Ray Dataset of blocks of `per_task` rows."""
    import ray

    from workflows.data import TableSource

    table = pa.Table.from_pylist([{**r, "order": i} for i, r in enumerate(rows)])
    return ray.data.read_datasource(TableSource(table, per_task), num_cpus=0)


# --------------------------------------------------------------------------------------------------------------
# Transcoding on Ray Data


def transcode_batch(batch: dict[str, np.ndarray], settings: dict) -> dict[str, np.ndarray]:
    """Copy (or keep) each row's video at its `out_path`; adds status ("encoded", "kept", "failed"), error and
    the copy's num_frames, fps, width, height, bytes."""
    from evl.video.decode import VideoError
    from evl.video.transcode import TranscodeSettings, transcode_or_keep

    spec = TranscodeSettings(**settings)
    names = ("status", "error", "copy_frames", "copy_fps", "copy_width", "copy_height", "copy_bytes")
    out = {k: [] for k in names}
    for path, dst, n, w, h in zip(batch["path"], batch["out_path"], batch["num_frames"], batch["width"],
                                  batch["height"]):
        try:
            r = transcode_or_keep(str(path), str(dst), spec, int(n), int(w), int(h))
            values = (r.status, "", r.num_frames, r.fps, r.width, r.height, r.bytes)
        except VideoError as e:
            values = ("failed", e.reason, 0, 0.0, 0, 0, 0)
        except Exception as e:  # noqa: BLE001 - one video's failure, whatever it is, is only that video's
            values = ("failed", f"{type(e).__name__}: {' '.join(str(e).split())[:200]}", 0, 0.0, 0, 0, 0)
        for key, value in zip(names, values):
            out[key].append(value)
    dtypes = {"status": object, "error": object, "copy_fps": np.float64}
    return {**batch, **{k: np.asarray(v, dtype=dtypes.get(k, np.int64)) for k, v in out.items()}}


def transcode_all(jobs: list[dict], settings, resources: dict | None = None) -> list[dict]:
    """Run transcode_batch over jobs ({path, out_path, num_frames, width, height}) as one Ray Data job, one CPU
    per task; prints a progress line per tenth of the videos. Returns the jobs with results, in input order."""
    import ray

    if not jobs:
        return []
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    per_task = int(np.clip(len(jobs) // (4 * cpus), 1, TRANSCODE_PER_TASK))
    ds = _row_dataset(jobs, per_task).map_batches(
        transcode_batch, fn_kwargs={"settings": asdict(settings)}, batch_size=1, batch_format="numpy",
        num_cpus=1, resources=resources or None)
    done: list[dict] = []
    start, tenth = time.perf_counter(), 0
    for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        done += block.to_pylist()
        if len(done) * 10 // len(jobs) > tenth or len(done) == len(jobs):
            tenth = len(done) * 10 // len(jobs)
            counts = Counter(r["status"] for r in done)
            elapsed = time.perf_counter() - start
            eta = elapsed / len(done) * (len(jobs) - len(done))
            console.say(f"  {len(done)}/{len(jobs)} videos: {counts['encoded']} encoded, {counts['kept']} kept, "
                        f"{counts['failed']} failed  ETA {console.duration(eta)}")
    return sorted(done, key=lambda r: r["order"])


def _layout_root(dataset: str | None, data_root: str | None) -> str:
    root = data_root or dataset
    if not root:
        raise ValueError("--transcode needs --dataset or --data-root: the copies keep the layout under it")
    return storage.absolute(root)


def _check_destination(dest: str, root: str) -> None:
    """Refuse a DEST that is the dataset root, inside it, or holds it: a copy could then land on an original
    (or, inside the root, be found as one more video of the dataset by the next `evl prepare`)."""
    d, r = storage.comparable(dest), storage.comparable(root)
    if d == r:
        raise ValueError(f"--transcode {dest} is the dataset root {root}: copies would replace the originals")
    if d.startswith(r + "/"):
        raise ValueError(f"--transcode {dest} is inside the dataset root {root}: its copies could overwrite "
                         "originals and would be found as videos of the dataset; choose a folder outside it")
    if r.startswith(d + "/"):
        raise ValueError(f"--transcode {dest} holds the dataset root {root}: its copies could overwrite "
                         "originals; choose a folder beside it")


def _transcode_jobs(usable: list[dict], dest: str, root: str) -> tuple[list[dict], dict[str, str]]:
    """One job per distinct usable video (a video in two splits is copied once), and the videos that fail before
    any work (outside the root, two inputs wanting the same copy name): path -> reason."""
    from evl.video.transcode import output_path

    jobs, failed, taken, seen = [], {}, {}, set()
    for row in usable:
        path = row["path"]
        if path in seen:
            continue
        seen.add(path)
        try:
            out = output_path(path, root, dest)
        except ValueError:
            failed[path] = f"not under the dataset root {root}: no place for it in DEST's layout"
            continue
        if out in taken:
            failed[path] = f"its copy {out} would have the same name as the copy of {taken[out]}"
            continue
        taken[out] = path
        jobs.append({"path": path, "out_path": out, "num_frames": row["num_frames"], "width": row["width"],
                     "height": row["height"]})
    return jobs, failed


# --------------------------------------------------------------------------------------------------------------
# The whole job


def prepare_dataset(dataset: str | None, out: str, splits: list[str] | None = None,
                    annotations: list[str] | None = None, list_files: list[str] | None = None,
                    data_root: str | None = None, classes: str | None = None, transcode: str | None = None,
                    settings=None, resources: dict | None = None) -> dict:
    """Write `<out>/<split>.parquet`, `<out>/classes.json` and `<out>/summary.json`; returns the summary.

    transcode: DEST for training-ready copies (see the module docstring), with `settings` (a
    evl.video.transcode.TranscodeSettings; default: its defaults). resources: custom Ray resources every task
    asks for (e.g. {"decode_node": 0.001}).
    """
    start = time.perf_counter()
    sources = _sources(dataset, splits, annotations, list_files)
    names, class_source = _class_list(sources, classes)
    root = _layout_root(dataset, data_root) if transcode else None
    parsed = parse_sources(dataset, sources, names, data_root)
    rows = [{"split": split, **asdict(e)} for split, p in parsed.items() for e in p.entries]
    if transcode:
        _check_destination(transcode, root)
    probed = probe_all(rows, resources)
    summary = {"dataset": dataset, "out": out, "classes": len(names), "class_source": class_source,
               "splits": {}, "missing": [], "unreadable": [], "skipped_lines": []}
    by_split = {split: _split_rows(probed, split) for split in parsed}
    copies, reasons = None, {}
    if transcode:
        usable_rows = [r for rows, _ in by_split.values() for r in rows]
        copies, reasons, summary["transcode"] = _transcode(transcode, root, settings, resources, usable_rows)
    for split, p in parsed.items():
        usable, unreadable = by_split[split]
        manifest = join(out, f"{split}.parquet")
        if copies is None:
            write_manifest(usable, manifest)
        else:
            write_manifest(usable, join(out, ORIGINALS, f"{split}.parquet"))
            write_manifest([copies[r["path"]] | {k: r[k] for k in ("label", "label_name")} for r in usable
                            if r["path"] in copies], manifest)
        summary["splits"][split] = _split_summary(p, usable, unreadable, manifest, names)
        if copies is not None:
            in_manifest = sum(r["path"] in copies for r in usable)
            summary["splits"][split].update(copies=in_manifest, copy_failed=len(usable) - in_manifest,
                                            original_manifest=join(out, ORIGINALS, f"{split}.parquet"))
            summary["transcode"]["failures"] += [{"split": split, "path": r["path"], "reason": reasons[r["path"]]}
                                                 for r in usable if r["path"] not in copies]
        summary["unreadable"] += [{"split": split, "path": r["path"], "reason": r["error"]} for r in unreadable]
        summary["missing"] += [{"split": split, **asdict(m)} for m in p.missing]
        summary["skipped_lines"] += [{"split": split, **asdict(s)} for s in p.skipped]
    write_classes(join(out, CLASSES_FILE), names)
    if copies is not None:
        write_classes(join(out, ORIGINALS, CLASSES_FILE), names)
    summary["wall_s"] = round(time.perf_counter() - start, 2)
    _write_json(join(out, "summary.json"), summary)
    return summary


def _transcode(dest: str, root: str, settings, resources: dict | None,
               usable: list[dict]) -> tuple[dict[str, dict], dict[str, str], dict]:
    """Copy every usable video. Returns (original path -> its copy's manifest row without label, original path
    -> why it has no copy, the summary's "transcode" part with an empty "failures" list for the caller)."""
    from evl.video.transcode import TranscodeSettings

    settings = settings or TranscodeSettings()
    settings.validate()
    start = time.perf_counter()
    jobs, reasons = _transcode_jobs(usable, dest, root)
    videos = len(jobs) + len(reasons)
    console.say(f"transcoding {len(jobs)} videos into {dest} (short side {settings.short_side}, keyframe every "
                f"{settings.keyint} frames, crf {settings.crf} {settings.preset}) ...")
    results = transcode_all(jobs, settings, resources)
    copies = {}
    for r in results:
        if r["status"] == "failed":
            reasons[r["path"]] = r["error"]
        elif r["copy_frames"] != r["num_frames"]:  # transcode_or_keep checks it; never trust a manifest blindly
            reasons[r["path"]] = f"copy has {r['copy_frames']} frames, the original {r['num_frames']}"
        else:
            copies[r["path"]] = {"path": r["out_path"], "num_frames": r["copy_frames"], "fps": r["copy_fps"],
                                 "width": r["copy_width"], "height": r["copy_height"]}
    counts = Counter(r["status"] for r in results)
    part = {"dest": dest, "root": root, **asdict(settings), "videos": videos, "encoded": counts["encoded"],
            "kept": counts["kept"], "failed": len(reasons),
            "mbytes": round(sum(r["copy_bytes"] for r in results if r["path"] in copies) / 1e6, 3),
            "wall_s": round(time.perf_counter() - start, 2), "failures": []}
    return copies, reasons, part


def _split_rows(probed: pa.Table, split: str) -> tuple[list[dict], list[dict]]:
    if probed.num_rows == 0:
        return [], []
    rows = [r for r in probed.to_pylist() if r["split"] == split]
    return [r for r in rows if not r["error"]], [r for r in rows if r["error"]]


def _split_summary(parsed: ParsedSplit, usable: list[dict], unreadable: list[dict], manifest: str,
                   names: list[str]) -> dict:
    per_class = Counter(r["label_name"] for r in usable)
    return {
        "annotated": len(parsed.entries) + len(parsed.missing) + len(parsed.skipped),
        "usable": len(usable),
        "missing": len(parsed.missing),
        "unreadable": len(unreadable),
        "skipped_lines": len(parsed.skipped),
        "manifest": manifest,
        "per_class": {name: per_class.get(name, 0) for name in names},
    }


def _write_json(path: str, data: dict) -> None:
    storage.write_text(path, json.dumps(data, indent=1))


# --------------------------------------------------------------------------------------------------------------
# Printing


def format_summary(summary: dict, max_listed: int | None = None) -> str:
    """A readable report: per-split counts, per-class counts, then every excluded file and line."""
    lines = [f"classes: {summary['classes']} ({summary['class_source']})", ""]
    lines += _split_table(summary["splits"]) + [""] + _class_table(summary["splits"])
    lines += _listing("missing videos", [f"[{m['split']}] {m['file']}:{m['line']}: no file {m['video']}"
                                         for m in summary["missing"]], max_listed)
    lines += _listing("unreadable videos", [f"[{u['split']}] {u['path']}: {u['reason']}"
                                            for u in summary["unreadable"]], max_listed)
    lines += _listing("skipped annotation lines", [f"[{s['split']}] {s['file']}:{s['line']}: {s['reason']}: "
                                                   f"{s['text']!r}" for s in summary["skipped_lines"]], max_listed)
    if "transcode" in summary:
        t = summary["transcode"]
        lines += ["", f"copies in {t['dest']} (short side {t['short_side']}, keyframe every {t['keyint']} frames, "
                      f"crf {t['crf']} {t['preset']}): {t['encoded']} encoded, {t['kept']} kept (already complete), "
                      f"{t['failed']} failed; {t['mbytes']:.1f} MB in {t['wall_s']} s",
                  f"  manifests of the copies: {join(summary['out'], '<split>.parquet')}; of the originals: "
                  f"{join(summary['out'], ORIGINALS, '<split>.parquet')}"]
        lines += _listing("videos not transcoded (left out of the copies' manifests)",
                          [f"[{f['split']}] {f['path']}: {f['reason']}" for f in t["failures"]], max_listed)
    lines += ["", f"summary: {join(summary['out'], 'summary.json')} ({summary['wall_s']} s)"]
    return "\n".join(lines)


def _split_table(splits: dict) -> list[str]:
    copies = any("copies" in s for s in splits.values())
    lines = [f"{'split':<12}{'annotated':>10}{'usable':>9}{'missing':>9}{'unreadable':>12}{'skipped':>9}"
             + (f"{'copies':>9}" if copies else "")]
    for split, s in splits.items():
        lines.append(f"{split:<12}{s['annotated']:>10}{s['usable']:>9}{s['missing']:>9}{s['unreadable']:>12}"
                     f"{s['skipped_lines']:>9}" + (f"{s.get('copies', 0):>9}" if copies else "")
                     + f"   -> {s['manifest']}")
    return lines


def _class_table(splits: dict) -> list[str]:
    """Usable videos per class and split, then a warning for classes left without any."""
    lines = ["usable videos per class:", "  " + "".join(f"{split:>8}" for split in splits) + "  class"]
    names = next(iter(splits.values()))["per_class"] if splits else {}
    for name in names:
        lines.append("  " + "".join(f"{s['per_class'].get(name, 0):>8}" for s in splits.values()) + f"  {name}")
    warnings = []
    for split, s in splits.items():
        empty = [name for name, count in s["per_class"].items() if count == 0]
        if empty and s["usable"]:
            more = " ..." if len(empty) > 20 else ""
            warnings.append(f"warning: {len(empty)} class(es) have no usable {split} video: "
                            f"{', '.join(empty[:20])}{more}")
    return lines + ([""] + warnings if warnings else [])


def _listing(title: str, items: list[str], max_listed: int | None) -> list[str]:
    if not items:
        return []
    shown = items if max_listed is None else items[:max_listed]
    lines = ["", f"{title} ({len(items)}):"] + [f"  {item}" for item in shown]
    if len(shown) < len(items):
        lines.append(f"  ... and {len(items) - len(shown)} more in summary.json")
    return lines


if __name__ == "__main__":  # pragma: no cover
    from workflows.cli import main

    sys.exit(main(["prepare", *sys.argv[1:]]))
