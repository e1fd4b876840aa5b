"""Small files next to Ray's run directories (MLflow run ids, resolved configs, sweep summaries), on local
disk or any filesystem pyarrow reaches (s3://, gs://), as cluster runs keep their storage there."""

from __future__ import annotations


def filesystem(uri: str):
    """(pyarrow filesystem, path inside it) for a local path or a URI."""
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(uri) if "://" in uri else (pyarrow.fs.LocalFileSystem(), uri)


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode())


def read_text(uri: str) -> str | None:
    """The file's text, or None when it does not exist."""
    fs, path = filesystem(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read().decode()
    except (FileNotFoundError, OSError):
        return None


def latest_run(storage: str, prefix: str, marker: str) -> str | None:
    """Name of the newest folder `prefix*` under `storage` that holds the file `marker`, or None."""
    import pyarrow.fs

    fs, root = filesystem(storage)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
    runs = sorted((i for i in infos if i.type == pyarrow.fs.FileType.Directory and i.base_name.startswith(prefix)
                   and read_text(f"{storage}/{i.base_name}/{marker}") is not None), key=lambda i: i.mtime_ns or 0)
    return runs[-1].base_name if runs else None


def timestamped(name: str) -> str:
    """`name-YYYYmmdd-HHMMSS`: a fresh folder and MLflow run name for every new run of one config."""
    from datetime import datetime

    return f"{name}-{datetime.now():%Y%m%d-%H%M%S}"
