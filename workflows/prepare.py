"""`evl prepare`: annotations + videos -> one Parquet manifest per split, after probing every video on Ray.

Reads CVDF Kinetics annotations (`<dataset>/annotations/<split>.csv`, or the CSVs given) or list files
(`<path> <label>` lines under a data root), finds each video, then probes them all in parallel as a Ray
Data job (decode first and last frame, read count/fps/size). Unusable videos and bad annotation lines are
excluded and listed with their reason; they never stop the job.

Output in --out: `<split>.parquet` per split, `classes.json`, `summary.json` (also printed).
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

from evl.video.decode import join
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


def run(args: argparse.Namespace) -> int:
    from workflows.runtime import ensure_ray

    if not args.dataset and not args.list_file and not args.annotations:
        console.warn("evl prepare: give --dataset, --annotations or --list-file")
        return 2
    ensure_ray(args.address)
    try:
        summary = prepare_dataset(args.dataset, args.out, splits=args.splits, annotations=args.annotations,
                                  list_files=args.list_file, data_root=args.data_root, classes=args.classes)
    except (ValueError, FileNotFoundError) as e:
        console.warn(f"evl prepare: {e}")
        return 2
    console.say(format_summary(summary, args.max_listed))
    return 0 if any(s["usable"] for s in summary["splits"].values()) else 1


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
    return os.path.splitext(path.rstrip("/").rsplit("/", 1)[-1])[0]


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


def probe_all(rows: list[dict]) -> pa.Table:
    """Probe every row's video as one Ray Data job; rows come back with probe columns, in input order."""
    import ray

    from workflows.data import TableSource

    if not rows:
        return pa.table({})
    table = pa.Table.from_pylist([{**r, "order": i} for i, r in enumerate(rows)])
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    per_task = int(np.clip(len(rows) // (4 * cpus), PROBE_BATCH, 8 * PROBE_BATCH))  # >= 4 tasks per CPU
    ds = ray.data.read_datasource(TableSource(table, per_task), num_cpus=0)
    ds = ds.map_batches(probe_batch, batch_size=PROBE_BATCH, batch_format="numpy", num_cpus=1)
    result = pa.concat_tables(ray.get(ds.to_arrow_refs()))
    return result.sort_by("order")


# --------------------------------------------------------------------------------------------------------------
# The whole job


def prepare_dataset(dataset: str | None, out: str, splits: list[str] | None = None,
                    annotations: list[str] | None = None, list_files: list[str] | None = None,
                    data_root: str | None = None, classes: str | None = None) -> dict:
    """Write `<out>/<split>.parquet`, `<out>/classes.json` and `<out>/summary.json`; returns the summary."""
    start = time.perf_counter()
    sources = _sources(dataset, splits, annotations, list_files)
    names, class_source = _class_list(sources, classes)
    parsed = parse_sources(dataset, sources, names, data_root)
    rows = [{"split": split, **asdict(e)} for split, p in parsed.items() for e in p.entries]
    probed = probe_all(rows)
    summary = {"dataset": dataset, "out": out, "classes": len(names), "class_source": class_source,
               "splits": {}, "missing": [], "unreadable": [], "skipped_lines": []}
    for split, p in parsed.items():
        usable, unreadable = _split_rows(probed, split)
        manifest = join(out, f"{split}.parquet")
        write_manifest(usable, manifest)
        summary["splits"][split] = _split_summary(p, usable, unreadable, manifest, names)
        summary["unreadable"] += [{"split": split, "path": r["path"], "reason": r["error"]} for r in unreadable]
        summary["missing"] += [{"split": split, **asdict(m)} for m in p.missing]
        summary["skipped_lines"] += [{"split": split, **asdict(s)} for s in p.skipped]
    write_classes(join(out, CLASSES_FILE), names)
    summary["wall_s"] = round(time.perf_counter() - start, 2)
    _write_json(join(out, "summary.json"), summary)
    return summary


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
    from evl.video.decode import resolve

    fs, inner = resolve(path)
    fs.create_dir(os.path.dirname(inner), recursive=True)
    with fs.open_output_stream(inner) as stream:
        stream.write(json.dumps(data, indent=1).encode())


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
    lines += ["", f"summary: {join(summary['out'], 'summary.json')} ({summary['wall_s']} s)"]
    return "\n".join(lines)


def _split_table(splits: dict) -> list[str]:
    lines = [f"{'split':<12}{'annotated':>10}{'usable':>9}{'missing':>9}{'unreadable':>12}{'skipped':>9}"]
    for split, s in splits.items():
        lines.append(f"{split:<12}{s['annotated']:>10}{s['usable']:>9}{s['missing']:>9}{s['unreadable']:>12}"
                     f"{s['skipped_lines']:>9}   -> {s['manifest']}")
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
