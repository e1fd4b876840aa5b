"""Reading video datasets as users have them, and the manifest that the training pipeline reads.

Two input formats:
  * CVDF Kinetics: `annotations/<split>.csv` (header `label,youtube_id,time_start,time_end,split[,is_cc]`)
    and videos named `<youtube_id>_<time_start:06d>_<time_end:06d>.mp4` anywhere under the dataset root
    (flat, per split, or one folder per class); a bare `<youtube_id>.mp4` is accepted too.
  * List files (reference, mmaction2, PySlowFast): one `<path> <label index>` per line, paths relative to a
    data root. Paths may contain spaces: the label is whatever follows the last whitespace.

Bad annotation lines (malformed, unknown label, duplicate) are skipped and returned with a reason, never
raised: a 240k-line file with a few broken lines should still prepare.

Manifest: a Parquet file per split with MANIFEST_SCHEMA, plus `classes.json` (the class names in label
order) beside it.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources

import pyarrow as pa
import pyarrow.parquet as pq

from evl import storage

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v")
CVDF_COLUMNS = ("label", "youtube_id", "time_start", "time_end")
CLASSES_FILE = "classes.json"

MANIFEST_SCHEMA = pa.schema([
    pa.field("path", pa.string(), nullable=False),  # absolute local path or URI
    pa.field("label", pa.int64(), nullable=False),  # index into classes.json
    pa.field("label_name", pa.string(), nullable=False),
    pa.field("num_frames", pa.int64(), nullable=False),
    pa.field("fps", pa.float64(), nullable=False),
    pa.field("width", pa.int64(), nullable=False),
    pa.field("height", pa.int64(), nullable=False),
])


@dataclass(frozen=True)
class Entry:
    """An annotated video that exists (not yet probed)."""

    path: str
    label: int
    label_name: str


@dataclass(frozen=True)
class Skipped:
    """An annotation line that was not used, and why."""

    file: str
    line: int
    reason: str
    text: str


@dataclass(frozen=True)
class Missing:
    """An annotation whose video file was not found."""

    file: str
    line: int
    video: str  # the file name that was looked for
    label_name: str


@dataclass
class ParsedSplit:
    """One split's annotations: usable entries, plus what was left out and why."""

    entries: list[Entry]
    skipped: list[Skipped]
    missing: list[Missing]


# --------------------------------------------------------------------------------------------------------------
# Classes


def kinetics400_classes() -> list[str]:
    """The 400 Kinetics labels in the reference's index order (sorted; index = position)."""
    text = resources.files("evl.video").joinpath("k400_classes.json").read_text()
    return json.loads(text)


def choose_classes(label_names: Iterable[str]) -> list[str]:
    """Kinetics-400's list if every label is one of its classes, else the sorted distinct labels."""
    names = set(label_names)
    k400 = kinetics400_classes()
    if names and names <= set(k400):
        return k400
    return sorted(names)


def read_classes(path: str) -> list[str]:
    """A JSON list of class names; `path` may be the list itself or a manifest it sits beside."""
    if path.endswith(".parquet"):
        path = storage.join(storage.parent(path), CLASSES_FILE)
    try:
        names = json.loads(storage.read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON: {e}") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{path} must hold a JSON list of class names")
    return names


def write_classes(path: str, classes: list[str]) -> None:
    storage.write_text(path, json.dumps(classes, indent=1))


# --------------------------------------------------------------------------------------------------------------
# CVDF Kinetics


@dataclass(frozen=True)
class CsvRow:
    label: str
    youtube_id: str
    time_start: int
    time_end: int
    line: int

    @property
    def stem(self) -> str:
        return f"{self.youtube_id}_{self.time_start:06d}_{self.time_end:06d}"


def read_cvdf_csv(path: str) -> tuple[list[CsvRow], list[Skipped]]:
    """Rows of a CVDF annotation CSV; malformed rows and duplicates come back as Skipped."""
    reader = csv.reader(io.StringIO(storage.read_text(path)))
    header = [h.strip() for h in next(reader, [])]
    if not set(CVDF_COLUMNS) <= set(header):
        raise ValueError(f"{path}: not a Kinetics annotation CSV (header {header}, need {', '.join(CVDF_COLUMNS)})")
    col = {name: header.index(name) for name in CVDF_COLUMNS}
    rows, skipped, seen = [], [], {}
    for number, fields in enumerate(reader, start=2):
        if not any(f.strip() for f in fields):
            continue
        row, reason = _csv_row(fields, col, len(header), number)
        if row is not None and row.stem in seen:
            row, reason = None, f"duplicate of line {seen[row.stem]}"
        if row is None:
            skipped.append(Skipped(path, number, reason, ",".join(fields)))
            continue
        seen[row.stem] = number
        rows.append(row)
    return rows, skipped


def _csv_row(fields: list[str], col: dict[str, int], width: int, number: int) -> tuple[CsvRow | None, str]:
    if len(fields) != width:
        return None, f"expected {width} fields, got {len(fields)}"
    label, youtube_id = fields[col["label"]].strip(), fields[col["youtube_id"]].strip()
    if not label:
        return None, "no label"
    if not youtube_id:
        return None, "no youtube_id"
    try:
        start, end = int(float(fields[col["time_start"]])), int(float(fields[col["time_end"]]))
    except ValueError:
        return None, "time_start/time_end are not numbers"
    if start < 0 or end < start:
        return None, f"bad time range {start}-{end}"
    return CsvRow(label, youtube_id, start, end, number), ""


def find_videos(root: str, extensions: tuple[str, ...] = VIDEO_EXTENSIONS) -> dict[str, str]:
    """File stem -> path of every video under `root` (recursively; local path or URI).

    When the same stem exists twice (say, a broken original and its replacement), the larger file wins.
    """
    best: dict[str, tuple[int, str]] = {}
    for path, size in _walk(root):
        stem, ext = os.path.splitext(storage.basename(path))
        if ext.lower() not in extensions:
            continue
        if stem not in best or size > best[stem][0]:
            best[stem] = (size, path)
    return {stem: path for stem, (_, path) in best.items()}


def _walk(root: str) -> Iterable[tuple[str, int]]:
    """(path, size) of every file under root."""
    for entry in storage.walk(root):
        yield entry.path, entry.size


def cvdf_split(csv_path: str, videos: dict[str, str], classes: list[str]) -> ParsedSplit:
    """Match the rows of one annotation CSV to video files and class indices."""
    rows, skipped = read_cvdf_csv(csv_path)
    index = {name: i for i, name in enumerate(classes)}
    entries, missing = [], []
    for row in rows:
        if row.label not in index:
            skipped.append(Skipped(csv_path, row.line, f"unknown label {row.label!r}", _row_text(row)))
            continue
        path = videos.get(row.stem) or videos.get(row.youtube_id)
        if path is None:
            missing.append(Missing(csv_path, row.line, row.stem + ".mp4", row.label))
            continue
        entries.append(Entry(path, index[row.label], row.label))
    return ParsedSplit(entries, sorted(skipped, key=lambda s: s.line), missing)


def _row_text(row: CsvRow) -> str:
    return f"{row.label},{row.youtube_id},{row.time_start},{row.time_end}"


def cvdf_labels(csv_paths: Iterable[str]) -> set[str]:
    """Every label named by well-formed rows of these CSVs (to build one class list for all splits)."""
    labels = set()
    for path in csv_paths:
        labels.update(row.label for row in read_cvdf_csv(path)[0])
    return labels


# --------------------------------------------------------------------------------------------------------------
# List files


def list_file_split(list_path: str, data_root: str, classes: list[str]) -> ParsedSplit:
    """`<path> <label index>` lines; paths relative to data_root unless absolute or URIs.

    Existence is not checked here (the probe reports missing files), so no directory listing is needed.
    """
    entries, skipped, seen = [], [], {}
    for number, raw in enumerate(storage.read_text(list_path).splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        entry, reason = _list_entry(line, data_root, classes)
        if entry is not None and entry.path in seen:
            entry, reason = None, f"duplicate of line {seen[entry.path]}"
        if entry is None:
            skipped.append(Skipped(list_path, number, reason, raw))
            continue
        seen[entry.path] = number
        entries.append(entry)
    return ParsedSplit(entries, skipped, [])


def _list_entry(line: str, data_root: str, classes: list[str]) -> tuple[Entry | None, str]:
    parts = line.rsplit(None, 1)
    if len(parts) != 2:
        return None, "expected '<path> <label index>'"
    rel, label_text = parts
    try:
        label = int(label_text)
    except ValueError:
        return None, f"label {label_text!r} is not an integer"
    if not 0 <= label < len(classes):
        return None, f"label index {label} out of range [0, {len(classes)})"
    path = rel if storage.is_absolute(rel) else storage.join(data_root, rel)
    return Entry(storage.absolute(path), label, classes[label]), ""


# --------------------------------------------------------------------------------------------------------------
# Manifest


def manifest_table(rows: list[dict] | pa.Table) -> pa.Table:
    """Rows (dicts with at least the schema's columns) -> a table with exactly MANIFEST_SCHEMA."""
    if isinstance(rows, pa.Table):
        columns = {name: rows.column(name).to_pylist() for name in MANIFEST_SCHEMA.names}
    else:
        columns = {name: [row[name] for row in rows] for name in MANIFEST_SCHEMA.names}
    return pa.table(columns, schema=MANIFEST_SCHEMA)


def write_manifest(rows: list[dict] | pa.Table, path: str, classes: list[str] | None = None) -> pa.Table:
    """Write a Parquet manifest (local path or URI) and, if given, `classes.json` beside it."""
    table = manifest_table(rows)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes(path, sink.getvalue().to_pybytes())
    if classes is not None:
        write_classes(storage.join(storage.parent(path), CLASSES_FILE), classes)
    return table


def read_manifest(path: str) -> pa.Table:
    """A manifest written by write_manifest; fails with the missing columns named."""
    try:
        table = pq.read_table(pa.BufferReader(storage.read_bytes(path)))
    except pa.ArrowInvalid as e:
        raise ValueError(f"{path} is not a Parquet manifest: {e}") from None
    missing = [n for n in MANIFEST_SCHEMA.names if n not in table.column_names]
    if missing:
        raise ValueError(f"{path} is not a video manifest: missing column(s) {', '.join(missing)}")
    return table
